"""The model side of a collection run, behind one small interface so the collector (corpus packing,
keep mask, shard buffers, writer thread, resume) is the same code for every backend:

- `torch`: a transformers model with saeforge's hooks (collect/hooks.py), stopped after the deepest hook;
- `llama.cpp`: a GGUF model run quantised by llama.cpp (collect/llamacpp.py), read through its eval
  callback, so a model too big for float32 in RAM (an 8B model at Q4: ~5 GB) can be collected.
"""
from __future__ import annotations

import time
import typing
from typing import Any, Literal, Protocol

import numpy as np
import torch

from collect.hooks import forward_to
from collect.layers import discover_layout, output_module, parse_hook_points
from collect.model import LoadedModel, load_model, max_positions, resolve_spec
from saeforge.errors import UserError

BackendName = Literal["torch", "llama.cpp"]
BACKENDS: tuple[str, ...] = typing.get_args(BackendName)


class Backend(Protocol):
    """What the collector needs from a model."""
    tokenizer: Any
    names: list[str]       # canonical hook points, in the order asked
    d_model: int
    n_layers: int
    max_positions: int | None  # the longest sequence the model takes, when known

    def forward(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        """`ids [B, T]` → ({hook point: float32 CPU tensor [B, T, d_model]}, seconds spent)."""
        ...

    def attrs(self) -> dict[str, Any]:
        """Store attributes that describe the model and how it was run."""
        ...


class TorchBackend:
    """A transformers model with hooks; the forward stops after the deepest hook point."""

    def __init__(self, loaded: LoadedModel, hooks: list[str]):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.layout = discover_layout(loaded.model)
        self.points = parse_hook_points(self.layout, hooks)
        self.names = [p.name for p in self.points]
        self.d_model = int(loaded.model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
        self.n_layers = self.layout.n_layers
        self.max_positions = max_positions(loaded.model)

    def forward(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        x = torch.from_numpy(ids.astype(np.int64)).to(self.loaded.device)
        t0 = time.perf_counter()
        acts = forward_to(self.loaded.model, x, self.names, layout=self.layout)
        return {h: acts[h].float().cpu() for h in self.names}, time.perf_counter() - t0

    def attrs(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"backend": "torch", "model_hash": self.loaded.weights_hash,
                "model_class": type(self.loaded.model).__name__,
                "tokenizer": getattr(tok, "name_or_path", "") or self.loaded.spec,
                "hook_modules": {p.name: p.module for p in self.points},
                "hook_outputs": {p.name: output_module(self.layout, p) for p in self.points}, "n_layers": self.n_layers}


class LlamaCppBackend:
    """A GGUF model in llama.cpp, quantised as it is; hook points read from its graph tensors."""

    def __init__(self, spec: str, hooks: list[str], device: str = "cpu", threads: int | None = None):
        from collect.llamacpp import LlamaCppModel, LlamaCppTokenizer, gguf_fingerprint, graph_point
        path = gguf_path(spec)
        self.lm = LlamaCppModel(path, n_threads=threads or torch.get_num_threads(),
                                n_gpu_layers=0 if device == "cpu" else -1)
        self.points = [graph_point(h, self.lm.n_layer, self.lm.arch) for h in hooks]
        names = [p.name for p in self.points]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"--hooks names {dup[0]!r} twice (after resolving negative indices); list each once")
        self.names = names
        self.tokenizer = LlamaCppTokenizer(self.lm)
        self.d_model = self.lm.n_embd
        self.n_layers = self.lm.n_layer
        self.max_positions: int | None = self.lm.n_ctx_train or None
        self._hash = gguf_fingerprint(path)

    def forward(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        t0 = time.perf_counter()
        acts = self.lm.hidden(ids, self.points)
        return {h: torch.from_numpy(acts[h]) for h in self.names}, time.perf_counter() - t0

    def attrs(self) -> dict[str, Any]:
        import llama_cpp
        lm = self.lm
        return {"backend": "llama.cpp", "quantization": lm.quantization, "model_hash": self._hash,
                "model_class": f"llama.cpp:{lm.arch}", "tokenizer": self.tokenizer.name_or_path,
                "hook_modules": {p.name: p.tensor for p in self.points}, "n_layers": lm.n_layer,
                "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "llama_cpp_threads": lm.n_threads}


def gguf_path(spec: str) -> str:
    """The .gguf file a model spec names (the alias, a .gguf path, or a folder holding one)."""
    source, gguf_file = resolve_spec(spec)
    if gguf_file is None:
        raise UserError(f"--backend llama.cpp runs GGUF files, but model {spec!r} is not one; pass a .gguf path "
                        f"(convert HF models with llama.cpp's convert_hf_to_gguf.py) or use --backend torch")
    return f"{source}/{gguf_file}"


def open_backend(name: str, spec: str, hooks: list[str], device: str, model_dtype: str = "float32",
                 loaded: LoadedModel | None = None) -> Backend:
    """The backend a run asks for; `loaded` reuses an already loaded PyTorch model."""
    if name == "torch":
        return TorchBackend(loaded or load_model(spec, device, model_dtype), hooks)
    if name == "llama.cpp":
        if model_dtype != "float32":
            raise UserError(f"--model-dtype {model_dtype} does not apply to --backend llama.cpp, which computes "
                            f"in the GGUF's own types; drop --model-dtype")
        return LlamaCppBackend(spec, hooks, device)
    raise UserError(f"--backend {name!r} is not known; use one of {list(BACKENDS)}")

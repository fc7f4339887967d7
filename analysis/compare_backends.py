"""llama.cpp's layer vectors next to PyTorch's: the same token ids through both backends, each hook
point read in each (llama.cpp: its graph tensors through the eval callback; PyTorch: saeforge's hooks),
compared per layer and position by cosine, relative error and norms, plus whether the two predict the
same next token. The PyTorch model is the GGUF de-quantised to float32 by transformers; llama.cpp runs
it quantised (e.g. Q4_1 weights, Q8 activations in its matmuls), so the difference is quantisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from collect.hooks import capture
from saeforge.errors import UserError


@dataclass
class PromptComparison:
    prompt: str
    tokens: list[int]
    pieces: list[str]
    same_tokenization: bool        # llama.cpp's tokenizer gives these ids too
    points: list[str]
    cosine: np.ndarray             # [points, positions]
    rel_error: np.ndarray          # |llama − torch| / |torch|
    norm_torch: np.ndarray
    norm_llama: np.ndarray
    top1_torch: list[int] = field(default_factory=list)   # next-token argmax per position
    top1_llama: list[int] = field(default_factory=list)

    @property
    def top1_agree(self) -> np.ndarray:
        return np.asarray(self.top1_torch) == np.asarray(self.top1_llama)


def all_resid_post(n_layers: int) -> list[str]:
    return [f"layers.{i}.resid_post" for i in range(n_layers)]


@torch.no_grad()
def torch_side(model: torch.nn.Module, tokens: list[int], points: Sequence[str]) -> tuple[dict[str, np.ndarray],
                                                                                           np.ndarray]:
    """({hook point: [T, d]}, logits [T, V]) of one full PyTorch forward."""
    dev = next(model.parameters()).device
    ids = torch.tensor([tokens], device=dev)
    with capture(model, list(points)) as acts:
        logits = model(input_ids=ids, use_cache=False).logits[0]
    return {p: acts[p][0].float().cpu().numpy() for p in points}, logits.float().cpu().numpy()


def compare_prompt(lm: Any, lcm: Any, prompt: str, points: Sequence[str], bos: bool = False) -> PromptComparison:
    """One prompt through both backends on the same token ids (saeforge's tokenizer, no specials unless `bos`)."""
    from collect.llamacpp import graph_point
    tok = lm.tokenizer
    ids = list(tok(prompt, add_special_tokens=False).input_ids)
    native = lcm.tokenize(prompt, add_special=False, parse_special=False)
    if bos:
        b = tok.bos_token_id
        if b is None:
            raise UserError("--bos: this tokenizer has no BOS token; drop --bos")
        ids, native = [b, *ids], [b, *native]
    if not ids:
        raise UserError(f"prompt {prompt!r} has no tokens; pass a non-empty prompt")
    gpoints = [graph_point(p, lcm.n_layer, lcm.arch) for p in points]
    names = [g.name for g in gpoints]
    t_acts, t_logits = torch_side(lm.model, ids, names)
    l_acts, l_logits = lcm.hidden_and_logits(np.asarray([ids], dtype=np.int32), gpoints)
    n_p, n_t = len(names), len(ids)
    cos, rel = np.zeros((n_p, n_t)), np.zeros((n_p, n_t))
    nt, nl = np.zeros((n_p, n_t)), np.zeros((n_p, n_t))
    for i, p in enumerate(names):
        a, b = t_acts[p].astype(np.float64), l_acts[p][0].astype(np.float64)
        na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
        cos[i] = (a * b).sum(-1) / np.maximum(na * nb, 1e-30)
        rel[i] = np.linalg.norm(b - a, axis=-1) / np.maximum(na, 1e-30)
        nt[i], nl[i] = na, nb
    return PromptComparison(prompt, ids, [tok.decode([t]) for t in ids], native == ids, names, cos, rel, nt, nl,
                            t_logits.argmax(-1).tolist(), l_logits[0].argmax(-1).tolist())


def rows(comps: Sequence[PromptComparison]) -> list[dict[str, Any]]:
    """One CSV row per prompt, hook point and position."""
    out = []
    for k, c in enumerate(comps):
        agree = c.top1_agree
        for i, p in enumerate(c.points):
            for t in range(len(c.tokens)):
                out.append({"prompt": k, "point": p, "position": t, "token": c.pieces[t],
                            "cosine": round(float(c.cosine[i, t]), 7), "rel_error": round(float(c.rel_error[i, t]), 7),
                            "norm_torch": round(float(c.norm_torch[i, t]), 4),
                            "norm_llama": round(float(c.norm_llama[i, t]), 4), "top1_agree": bool(agree[t])})
    return out


def summary(comps: Sequence[PromptComparison]) -> dict[str, Any]:
    """Per hook point over every prompt and position: min/mean cosine, mean/max relative error."""
    points = comps[0].points
    per = {}
    for i, p in enumerate(points):
        cos = np.concatenate([c.cosine[i] for c in comps])
        rel = np.concatenate([c.rel_error[i] for c in comps])
        per[p] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                  "rel_error_mean": float(rel.mean()), "rel_error_max": float(rel.max())}
    agree = np.concatenate([c.top1_agree for c in comps])
    return {"points": per, "positions": int(agree.size), "top1_agree": int(agree.sum()),
            "same_tokenization": all(c.same_tokenization for c in comps),
            "prompts": [{"prompt": c.prompt, "tokens": c.tokens, "pieces": c.pieces,
                         "same_tokenization": c.same_tokenization,
                         "top1_torch": c.top1_torch, "top1_llama": c.top1_llama} for c in comps]}

"""Activation patching: copy the clean run's activation at one (layer, position) of a hook point into
the corrupted run and measure how much of the metric comes back.

Score = (metric_patched - metric_corrupt) / (metric_clean - metric_corrupt): 0 = corrupted, 1 = clean.
The metric is the logit difference answer − wrong at the last position (or the answer's probability).
Batched over positions: per layer the corrupted prompt runs as a batch of copies, row r patched at
position r only (an edit hook with a per-row mask), so a layer costs one forward.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from analysis.lens import encode_prompt, single_token_id, token_strings
from saeforge.errors import UserError
from collect.hooks import HookCall, capture, hooks
from collect.layers import Layout, discover_layout
from saeforge.progress import progress

log = logging.getLogger(__name__)

SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out")
METRICS = ("logit_diff", "prob")


def compute_metric(logits: torch.Tensor, answer_id: int, wrong_id: int, metric: str = "logit_diff") -> torch.Tensor:
    """`[batch, vocab]` last-position logits → `[batch]` metric (float32)."""
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, answer_id] - logits[:, wrong_id]
    if metric == "prob":
        return torch.softmax(logits, dim=-1)[:, answer_id]
    raise UserError(f"--metric {metric!r} is unknown; use one of {list(METRICS)}")


def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`[batch, vocab]` logits at the last position (unembedding only that position where the model's
    forward takes `logits_to_keep`)."""
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return model(input_ids=ids, use_cache=False, **kw).logits[:, -1]


@torch.no_grad()
def patched_metric(model: torch.nn.Module, corrupt_ids: torch.Tensor, point: str, clean_act: torch.Tensor,
                   mask: torch.Tensor, answer_id: int, wrong_id: int, metric: str = "logit_diff",
                   layout: Layout | None = None) -> torch.Tensor:
    """Run `corrupt_ids` ([1, T]) as a batch of `mask.shape[0]` copies; in row r, positions where
    `mask[r]` is true take `clean_act` ([1, T, d]) at `point`. Returns the raw metric per row."""
    rows = mask.shape[0]
    ids = corrupt_ids.expand(rows, -1)
    m = mask.to(corrupt_ids.device).unsqueeze(-1)

    def edit(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        return torch.where(m, clean_act.to(dtype=x.dtype, device=x.device).expand_as(x), x)

    with hooks(model, {point: edit}, layout):
        logits = last_logits(model, ids)
    return compute_metric(logits, answer_id, wrong_id, metric)


@dataclass
class PatchResult:
    """`scores[l, p]`: normalised recovery when position p of `site` at `layers[l]` is patched
    (0 = corrupted, 1 = clean); `raw` holds the metric itself."""
    clean: str
    corrupt: str
    answer: str
    wrong: str
    answer_id: int
    wrong_id: int
    site: str
    metric: str
    layers: list[int]
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    clean_metric: float
    corrupt_metric: float
    raw: torch.Tensor
    scores: torch.Tensor

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per (layer, position), for CSV."""
        return [{"layer": layer, "hook_point": f"layers.{layer}.{self.site}", "position": p,
                 "clean_token": self.clean_tokens[p], "corrupt_token": self.corrupt_tokens[p],
                 "metric": float(self.raw[li, p]), "score": float(self.scores[li, p])}
                for li, layer in enumerate(self.layers) for p in range(len(self.clean_tokens))]

    def summary(self) -> dict[str, Any]:
        return {"clean": self.clean, "corrupt": self.corrupt, "answer": self.answer, "wrong": self.wrong,
                "site": self.site, "metric": self.metric, "layers": self.layers,
                "clean_tokens": self.clean_tokens, "corrupt_tokens": self.corrupt_tokens,
                "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric}


def _check_lengths(tokenizer: Any, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor) -> None:
    if clean_ids.shape[1] != corrupt_ids.shape[1]:
        c, k = token_strings(tokenizer, clean_ids[0]), token_strings(tokenizer, corrupt_ids[0])
        raise UserError(f"--clean is {len(c)} tokens {c} but --corrupt is {len(k)} tokens {k}; patching needs "
                        "prompts of the same token length: reword one so both split into the same number of tokens")


@torch.no_grad()
def activation_patching(model: torch.nn.Module, tokenizer: Any, clean: str, corrupt: str, answer: str, wrong: str,
                        site: str = "resid_post", metric: str = "logit_diff", layers: list[int] | None = None,
                        batch_size: int = 64, layout: Layout | None = None, quiet: bool = True) -> PatchResult:
    """Patch every (layer, position) of `site` from the clean run into the corrupted run.

    `layers` picks layers (negative counts from the end; default all). `batch_size` caps the number
    of patched copies per forward (positions are split into chunks beyond it)."""
    if site not in SITES:
        raise UserError(f"--hook {site!r} is not a patchable site; use one of {list(SITES)}")
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r} is unknown; use one of {list(METRICS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    lay = layout or discover_layout(model)
    n = lay.n_layers
    answer_id = single_token_id(tokenizer, answer, "--answer")
    wrong_id = single_token_id(tokenizer, wrong, "--wrong")
    if answer_id == wrong_id and metric == "logit_diff":
        raise UserError(f"--answer {answer!r} and --wrong {wrong!r} are the same token; the logit difference "
                        "would always be 0: pass two different answers")
    if layers is None:
        layers = list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise UserError(f"--layers {bad} out of range: this model has {n} layers (use 0..{n - 1} or -{n}..-1)")
    layers = list(dict.fromkeys(i % n for i in layers))
    device = next(model.parameters()).device
    clean_ids = encode_prompt(tokenizer, clean, "--clean").to(device)
    corrupt_ids = encode_prompt(tokenizer, corrupt, "--corrupt").to(device)
    _check_lengths(tokenizer, clean_ids, corrupt_ids)
    if torch.equal(clean_ids, corrupt_ids):
        raise UserError("--clean and --corrupt tokenize identically; the corrupted prompt must differ")

    points = [f"layers.{i}.{site}" for i in layers]
    with capture(model, points, layout=lay) as acts:
        clean_logits = last_logits(model, clean_ids)
    clean_acts = {k: v.clone() for k, v in acts.items()}
    corrupt_logits = last_logits(model, corrupt_ids)
    m_clean = float(compute_metric(clean_logits, answer_id, wrong_id, metric)[0])
    m_corrupt = float(compute_metric(corrupt_logits, answer_id, wrong_id, metric)[0])
    log.info("%s: clean %.4f, corrupted %.4f", metric, m_clean, m_corrupt)
    denom = m_clean - m_corrupt
    if abs(denom) < 1e-6:
        raise UserError(f"the clean and corrupted prompts give the same {metric} ({m_clean:.4g}); nothing can be "
                        "recovered: pick a corruption that changes the answer")
    if (metric == "logit_diff" and not (m_clean > 0 > m_corrupt)):
        log.warning("clean logit diff %.3f and corrupted %.3f: usually the clean prompt prefers --answer (> 0) "
                    "and the corrupted one --wrong (< 0)", m_clean, m_corrupt)

    T = clean_ids.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=device)
    raw = torch.empty(len(layers), T)
    bar = progress(total=len(layers) * T, desc=f"patching {site}", unit="cell", quiet=quiet)
    for li, point in enumerate(points):
        for start in range(0, T, batch_size):
            mask = eye[start:start + batch_size]
            raw[li, start:start + mask.shape[0]] = patched_metric(
                model, corrupt_ids, point, clean_acts[point], mask, answer_id, wrong_id, metric, lay).cpu()
            bar.update(mask.shape[0])
    bar.close()
    scores = (raw - m_corrupt) / denom
    return PatchResult(clean=clean, corrupt=corrupt, answer=answer, wrong=wrong, answer_id=answer_id,
                       wrong_id=wrong_id, site=site, metric=metric, layers=layers,
                       clean_tokens=token_strings(tokenizer, clean_ids[0]),
                       corrupt_tokens=token_strings(tokenizer, corrupt_ids[0]),
                       clean_metric=m_clean, corrupt_metric=m_corrupt, raw=raw, scores=scores)

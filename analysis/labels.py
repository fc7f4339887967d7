"""Logit attribution of SAE latents and short labels.

Direct logit effect of latent i: W_dec[i] through the final norm's gain into the unembedding,
    logits_i = (W_dec[i] ⊙ g) · W_Uᵀ            (g = final-norm weight; 1 + weight for Gemma-style
                                                 norms; LayerNorm also centres the direction)
the same read-out SAELens/SAEDashboard show as positive and negative logits. The norm's 1/rms
scale is left out: it rescales every token's logit equally and does not change the ranking.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from typing import Any

import torch

from collect.layers import discover_layout

log = logging.getLogger(__name__)

# what tokenizers raise for ids they do not know (slow: IndexError/KeyError; fast: OverflowError/TypeError)
DECODE_ERRORS = (IndexError, KeyError, OverflowError, TypeError, ValueError)
WS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def final_norm_gain(model: torch.nn.Module) -> tuple[torch.Tensor | None, bool]:
    """(gain [d] or None, centre) of the model's final norm, found by layer discovery."""
    layout = getattr(model, "_saeforge_layout", None) or discover_layout(model)
    if layout.final_norm is None:
        return None, False
    norm = model.get_submodule(layout.final_norm)
    w = getattr(norm, "weight", None)
    centre = isinstance(norm, torch.nn.LayerNorm)
    if w is None:
        return None, centre
    w = w.detach().float()
    if "gemma" in type(norm).__name__.lower():  # Gemma RMSNorm scales by (1 + weight)
        w = 1.0 + w
    return w, centre


def unembedding(model: Any) -> torch.Tensor:
    """W_U as [vocab, d_model]."""
    return model.get_output_embeddings().weight.detach().float()


@dataclass
class LogitTable:
    """Top positive / negative output tokens per latent and a histogram of each latent's logits."""
    pos_ids: torch.Tensor  # [d_sae, top]
    pos_vals: torch.Tensor
    neg_ids: torch.Tensor  # [d_sae, top] most negative first
    neg_vals: torch.Tensor
    hist_heights: torch.Tensor  # [d_sae, bins]
    hist_lo: torch.Tensor  # [d_sae]
    hist_hi: torch.Tensor


def latent_directions(W_dec: torch.Tensor, gain: torch.Tensor | None, centre: bool) -> torch.Tensor:
    d = W_dec.detach().float()
    if centre:
        d = d - d.mean(1, keepdim=True)
    return d * gain if gain is not None else d


@torch.no_grad()
def logit_table(W_dec: torch.Tensor, model: torch.nn.Module, top: int = 10, bins: int = 40,
                batch: int = 512) -> LogitTable:
    """(W_dec ⊙ gain) · W_Uᵀ computed `batch` latents at a time (never a full [d_sae, vocab])."""
    gain, centre = final_norm_gain(model)
    W_U = unembedding(model).to(W_dec.device)
    n = W_dec.shape[0]
    pi, pv, ni, nv, hh, lo, hi = [], [], [], [], [], [], []
    for a in range(0, n, batch):
        dirs = latent_directions(W_dec[a:a + batch], None if gain is None else gain.to(W_dec.device), centre)
        logits = dirs @ W_U.t()
        v, i = logits.topk(top, dim=1)
        pv.append(v.cpu()); pi.append(i.cpu())
        v, i = (-logits).topk(top, dim=1)
        nv.append((-v).cpu()); ni.append(i.cpu())
        mn, mx = logits.min(1).values, logits.max(1).values
        span = (mx - mn).clamp_min(1e-12)
        b = ((logits - mn[:, None]) / span[:, None] * bins).long().clamp_(0, bins - 1)
        h = torch.zeros(logits.shape[0], bins, dtype=torch.int64, device=logits.device)
        h.scatter_add_(1, b, torch.ones_like(b))
        hh.append(h.cpu()); lo.append(mn.cpu()); hi.append(mx.cpu())
    return LogitTable(torch.cat(pi), torch.cat(pv), torch.cat(ni), torch.cat(nv), torch.cat(hh), torch.cat(lo), torch.cat(hi))


def vocab_strings(tokenizer, vocab_size: int | None = None) -> list[str]:
    """The text of every token id (decoded one at a time, as it appears in running text).

    Ids the tokenizer cannot decode (an unembedding padded past the tokenizer's vocabulary, which
    slow tokenizers reject) become `<id>`, with a warning that says how many."""
    n = vocab_size or len(tokenizer)
    try:
        return list(tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False))
    except DECODE_ERRORS as e:
        log.warning("batch decode of %d token ids failed (%s: %s); decoding one at a time", n, type(e).__name__, e)
    out, bad = [], []
    for i in range(n):
        try:
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False))
        except DECODE_ERRORS:
            out.append(f"<{i}>")
            bad.append(i)
    if bad:
        log.warning("%d of %d token ids could not be decoded (first: %s); they show as <id>", len(bad), n, bad[:5])
    return out


def show_ws(s: str) -> str:
    """Make whitespace visible: ␣ space, ↵ newline, ⇥ tab."""
    return "".join(WS.get(c, c) for c in s)


def short_token(s: str, width: int = 14) -> str:
    """A token for a label: surrounding spaces dropped, whitespace-only tokens shown as markers."""
    t = s.strip()
    t = show_ws(s) if not t else t
    return t if len(t) <= width else t[:width - 1] + "…"


def make_label(max_tokens: list[str], out_tokens: list[str], n_in: int = 3, n_out: int = 2) -> str:
    """`in1 · in2 · in3 → out1 · out2`: the most frequent tokens at the max position of the top
    examples (ties by first appearance, i.e. by activation) and the top positive output tokens."""
    counts = Counter(short_token(t) for t in max_tokens)
    first: dict[str, int] = {}
    for j, t in enumerate(short_token(t) for t in max_tokens):
        first.setdefault(t, j)
    ins = sorted(counts, key=lambda t: (-counts[t], first[t]))[:n_in]
    outs = []
    for t in out_tokens:
        s = short_token(t)
        if s not in outs:
            outs.append(s)
        if len(outs) == n_out:
            break
    left = " · ".join(ins) if ins else "(never fires)"
    return f"{left} → {' · '.join(outs)}" if outs else left


def label_tokens(label: str) -> str:
    """A token-list label as an explanation to score: its input tokens (the part after → names what
    the latent predicts, not where it fires)."""
    left = label.split(" → ")[0]
    toks = [t.strip() for t in left.split(" · ") if t.strip()]
    return "The tokens " + ", ".join(f'"{t}"' for t in toks) + "." if toks and left != "(never fires)" else label

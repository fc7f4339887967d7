"""Downstream metrics: the model's next-token loss with the SAE's reconstruction spliced in.

Held-out sequences are rebuilt from the store's own `tokens` (no corpus needed). Each batch runs
once with three copies of every sequence — clean, SAE-spliced, zero-ablated — so all three see the
same inputs. At the hook point the spliced copy gets x̂ = decode(encode(x)) and the ablated copy
gets 0, both only where the store's `keep` is true; keep=False positions (BOS, special tokens such
as the EOS between documents, norm outliers) keep their clean activation, as in training.

Positions averaged: every prediction of token t+1 from position t inside a sequence, except the
prediction made from the BOS position (pos 0 when the store was collected with prepend_bos). The
last position of a sequence has no target and is not counted.

    CE_x            mean over those positions of −log p_x(token_{t+1} | ≤ t)
    ce_loss_score   (CE_zero − CE_sae) / (CE_zero − CE_clean)          (CE loss recovered)
    KL_x            mean over those positions of KL(p_clean ‖ p_x) (nats)
    kl_div_score    (KL_zero − KL_sae) / KL_zero
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from saeforge.errors import UserError
from collect.hooks import HookCall, hooks
from saeforge.progress import progress
from collect.store import Store
from sae.architectures import SAE
from sae.bootstrap import BootstrapSpec, add_intervals, enough_units
from sae.eval_intervals import DOWNSTREAM_SUMS, downstream_figures

log = logging.getLogger(__name__)


def split_sequences(store: Store, n_seq: int, split: str = "heldout") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `n_seq` whole sequences of `split` in store order: (tokens, keep, pos), each [S, context]."""
    T = store.context
    block = T * max(1, 65536 // T)
    toks, keeps, poss = [], [], []
    have = 0
    for a in range(0, store.n_tokens - store.n_tokens % T, block):
        b = min(a + block, store.n_tokens - store.n_tokens % T)
        pos = store.pos(a, b).reshape(-1, T)
        seq = store.seq(a, b).reshape(-1, T)
        if (pos != np.arange(T)).any() or (seq != seq[:, :1]).any():
            raise UserError(f"store {store.path!r}: rows [{a}, {b}) are not whole sequences of context {T}; "
                            f"the store is damaged or was not written by `saeforge collect`")
        if split == "all":
            sel = np.ones(len(pos), dtype=bool)
        else:
            held = store.heldout(a, b).reshape(-1, T)[:, 0].astype(bool)
            sel = held if split == "heldout" else ~held
        if not sel.any():
            continue
        take = np.flatnonzero(sel)[: n_seq - have]
        toks.append(store.tokens(a, b).reshape(-1, T)[take])
        keeps.append(store.keep(a, b).reshape(-1, T)[take].astype(bool))
        poss.append(pos[take])
        have += len(take)
        if have >= n_seq:
            break
    if not toks:
        raise UserError(f"store {store.path!r} has no {split} sequences for the CE/KL evaluation; re-collect with "
                        f"--heldout-fraction 0.05 or pass --split all")
    return np.concatenate(toks), np.concatenate(keeps), np.concatenate(poss)


def predicted_mask(pos: torch.Tensor, prepend_bos: bool) -> torch.Tensor:
    """[S, T-1] bool: source positions t whose prediction of token t+1 is averaged."""
    src = pos[:, :-1]
    return ~(src == 0) if prepend_bos else torch.ones_like(src, dtype=torch.bool)


def splice_edit(sae: SAE, input_scale: float = 1.0):
    """An edit fn for `collect.hooks.hooks` plus a setter for the batch size and keep mask.

    The activation is [3B, T, d]: rows [0, B) stay clean, [B, 2B) get x̂ where keep, [2B, 3B) get 0
    where keep."""
    state: dict[str, Any] = {}
    sae_dev = next(sae.parameters()).device

    def set_batch(keep: torch.Tensor) -> None:
        state["keep"] = keep

    @torch.no_grad()
    def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        keep = state["keep"].to(x.device)
        B = keep.shape[0]
        if x.shape[0] != 3 * B:
            raise RuntimeError(f"splice expected a batch of {3 * B} sequences at {call.point.name}, got {x.shape[0]}")
        out = x.clone()
        rows = x[B:2 * B][keep].to(sae_dev, torch.float32)
        s = input_scale
        x_hat = sae.decode(sae.encode(rows * s if s != 1.0 else rows))
        x_hat = x_hat / s if s != 1.0 else x_hat
        out[B:2 * B][keep] = x_hat.to(x.device, x.dtype)
        out[2 * B:][keep] = 0
        return out

    return fn, set_batch


@torch.no_grad()
def downstream_metrics(sae: SAE, store: Store, hook: str, model: Any, ce_tokens: int, split: str = "heldout",
                       input_scale: float = 1.0, batch_tokens: int = 512, quiet: bool = True,
                       ci: BootstrapSpec | None = None) -> dict[str, Any]:
    """CE loss clean / with the SAE / zero-ablated, CE loss recovered, KL and KL score (see module doc).

    `model`: a collect.model.LoadedModel (the store's model). `ce_tokens` is rounded up to whole
    sequences of the store's context. With `ci`, each figure gets a `<name>_ci95` bootstrap
    interval over the sequences."""
    T = store.context
    n_seq = max(1, math.ceil(ce_tokens / T))
    tokens, keep, pos = split_sequences(store, n_seq, split)
    n_seq = len(tokens)
    prepend_bos = bool(store.attrs.get("prepend_bos", True))
    lm = model.model
    dev = model.device
    was = sae.training
    sae.eval()
    fn, set_batch = splice_edit(sae, input_scale)
    B = max(1, batch_tokens // T)
    sums = {k: 0.0 for k in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")}
    per_seq: list[np.ndarray] = []  # [b, 6] sums per sequence in DOWNSTREAM_SUMS order
    n_pred = 0
    bar = progress(total=n_seq * T, desc="ce/kl", unit="tok", quiet=quiet)
    try:
        with hooks(lm, {hook: fn}):
            for s in range(0, n_seq, B):
                ids = torch.from_numpy(tokens[s:s + B].astype(np.int64)).to(dev)
                b = ids.shape[0]
                set_batch(torch.from_numpy(keep[s:s + B]))
                logits = lm(input_ids=ids.repeat(3, 1), use_cache=False).logits[:, :-1].float()
                mask = predicted_mask(torch.from_numpy(pos[s:s + B]), prepend_bos).to(dev)
                target = ids[:, 1:]
                lp_clean = F.log_softmax(logits[:b], dim=-1)
                p_clean = lp_clean.exp()
                rows = {"ce_clean": _row_sums(-lp_clean.gather(-1, target.unsqueeze(-1)).squeeze(-1), mask)}
                for name, sl in (("sae", slice(b, 2 * b)), ("zero", slice(2 * b, 3 * b))):
                    lp = F.log_softmax(logits[sl], dim=-1)
                    rows[f"ce_{name}"] = _row_sums(-lp.gather(-1, target.unsqueeze(-1)).squeeze(-1), mask)
                    rows[f"kl_{name}"] = _row_sums((p_clean * (lp_clean - lp)).sum(-1), mask)
                    del lp
                for k, v in rows.items():
                    sums[k] += float(v.sum())
                per_seq.append(torch.stack([rows[k] for k in DOWNSTREAM_SUMS[:5]] + [mask.sum(1).double().cpu()], 1).numpy())
                n_pred += int(mask.sum())
                del logits, lp_clean, p_clean
                bar.update(b * T)
    finally:
        bar.close()
        sae.train(was)
    if n_pred == 0:
        raise UserError(f"no predicted positions in {n_seq} sequences of context {T}; use a store with --context >= 3")
    m = {k: v / n_pred for k, v in sums.items()}
    den = m["ce_zero"] - m["ce_clean"]
    out = {
        "ce_loss_clean": m["ce_clean"], "ce_loss_sae": m["ce_sae"], "ce_loss_zero": m["ce_zero"],
        "ce_loss_increase": m["ce_sae"] - m["ce_clean"],
        "ce_loss_score": (m["ce_zero"] - m["ce_sae"]) / den if den != 0 else math.nan,
        "kl_div_sae": m["kl_sae"], "kl_div_zero": m["kl_zero"],
        "kl_div_score": (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] != 0 else math.nan,
        "ce_sequences": n_seq, "ce_tokens": n_seq * T, "ce_positions": n_pred,
        "ce_spliced_positions": int(keep.sum()),
    }
    if ci is not None and enough_units(n_seq, ci, f"the CE/KL evaluation ({n_seq} {split} sequences of store "
                                                   f"{store.path!r})", f"raise --ce-tokens to {ci.min_units * T}"):
        add_intervals(out, np.concatenate(per_seq), downstream_figures, ci)
    return out


def _row_sums(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of v [S, T-1] over the masked positions (float64, on the CPU)."""
    return (v.double() * mask).sum(1).cpu()

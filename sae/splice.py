"""Downstream metrics: the model's next-token loss with the SAE's reconstruction spliced in.

Held-out sequences are rebuilt from the store's own `tokens` (no corpus needed). Each batch runs
once with three copies of every sequence — clean, SAE-spliced, zero-ablated — so all three see the
same inputs. At the hook point the spliced copy gets x̂ = decode(encode(x)) and the ablated copy
gets 0, both only where the store's `keep` is true; keep=False positions (BOS, special tokens such
as the EOS between documents, norm outliers) keep their clean activation, as in training.
A transcoder reads its input point and writes its output in place of the target point's (the MLP
output); a crosscoder writes every layer at once, and each layer alone in further copies (`Splice`).

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
import typing
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from saeforge.errors import UserError
from collect.hooks import HookCall, forward_to, hooks
from collect.layers import discover_layout, resolve_hook_point
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


class Splice:
    """Edit fns for `collect.hooks.hooks` that splice a dictionary in, plus the per-batch state.

    The model runs `copies`·B sequences: rows [0, B) stay clean, copy 1 gets the dictionary's output at
    every written hook point, copy 2 gets 0 there, and (a crosscoder) copy 3 + l gets the output at
    layer l alone; all only where keep. An SAE reads and writes one point; a transcoder reads its input
    point (copy 1's, which equals the clean one: nothing upstream is edited) and writes its target point
    later in the same forward; a crosscoder's outputs need every layer's clean activation first, so
    `prepare` computes them from a clean forward before the spliced one."""

    def __init__(self, sae: SAE, reads: list[str], writes: list[str], input_scale: float = 1.0):
        self.sae, self.reads, self.writes, self.s = sae, reads, writes, input_scale
        self.dev = next(sae.parameters()).device
        self.acausal = len(reads) > 1
        self.copies = 3 + (len(writes) if self.acausal else 0)
        self.keep: torch.Tensor | None = None
        self.outs: list[torch.Tensor] = []  # per written point: the dictionary's output at the kept rows

    def _apply(self, rows: torch.Tensor) -> torch.Tensor:
        """The dictionary's output (skip term included) for raw input rows."""
        s, x = self.s, rows.to(self.dev, torch.float32)
        _, out = self.sae.encode_decode(x * s if s != 1.0 else x)
        return out / s if s != 1.0 else out

    def set_batch(self, keep: torch.Tensor) -> None:
        self.keep, self.outs = keep, []

    @torch.no_grad()
    def prepare(self, lm: Any, ids: torch.Tensor) -> None:
        """A crosscoder's outputs at every layer from the clean activations (no-op for other kinds)."""
        if not self.acausal:
            return
        lay = discover_layout(lm)
        acts = forward_to(lm, ids, self.reads, layout=lay)
        keep = typing.cast(torch.Tensor, self.keep).to(ids.device)
        out = self._apply(torch.cat([acts[resolve_hook_point(lay, h).name][keep] for h in self.reads], dim=-1))
        d = self.sae.cfg.d_in
        self.outs = [out[:, j * d:(j + 1) * d] for j in range(len(self.writes))]

    def fns(self) -> dict[str, Any]:
        if self.acausal:
            return {h: self._writer(j) for j, h in enumerate(self.writes)}
        read, write = self.reads[0], self.writes[0]
        if read == write:
            return {write: self._writer(0, read_here=True)}
        return {read: self._reader(), write: self._writer(0)}

    def _reader(self):
        @torch.no_grad()
        def fn(x: torch.Tensor, call: HookCall) -> None:
            B = self._check(x, call)
            keep = typing.cast(torch.Tensor, self.keep).to(x.device)
            self.outs = [self._apply(x[B:2 * B][keep])]
        return fn

    def _writer(self, j: int, read_here: bool = False):
        @torch.no_grad()
        def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
            B = self._check(x, call)
            keep = typing.cast(torch.Tensor, self.keep).to(x.device)
            out_rows = self._apply(x[B:2 * B][keep]) if read_here else self.outs[j]
            out = x.clone()
            out[B:2 * B][keep] = out_rows.to(x.device, x.dtype)
            out[2 * B:3 * B][keep] = 0
            if self.acausal:
                c = 3 + j
                out[c * B:(c + 1) * B][keep] = out_rows.to(x.device, x.dtype)
            return out
        return fn

    def _check(self, x: torch.Tensor, call: HookCall) -> int:
        B = typing.cast(torch.Tensor, self.keep).shape[0]
        if x.shape[0] != self.copies * B:
            raise RuntimeError(f"splice expected a batch of {self.copies * B} sequences at {call.point.name}, "
                               f"got {x.shape[0]}")
        return B


@torch.no_grad()
def downstream_metrics(sae: SAE, store: Store, hook: str | Sequence[str], model: Any, ce_tokens: int,
                       split: str = "heldout", input_scale: float = 1.0, batch_tokens: int = 512, quiet: bool = True,
                       ci: BootstrapSpec | None = None, target: str | None = None) -> dict[str, Any]:
    """CE loss clean / with the dictionary / zero-ablated, CE loss recovered, KL and KL score (module doc).

    `hook`: the point(s) read; `target`: a transcoder's written point (default: what is read, so an SAE
    or crosscoder replaces its own input). A crosscoder also gets `ce_loss_sae_layers` /
    `kl_div_sae_layers`: its output spliced at one layer alone, in the order of its hook points.
    `model`: a collect.model.LoadedModel (the store's model). `ce_tokens` is rounded up to whole
    sequences of the store's context. With `ci`, each figure gets a `<name>_ci95` bootstrap
    interval over the sequences."""
    reads = [hook] if isinstance(hook, str) else list(hook)
    writes = [target] if target else reads
    T = store.context
    n_seq = max(1, math.ceil(ce_tokens / T))
    tokens, keep, pos = split_sequences(store, n_seq, split)
    n_seq = len(tokens)
    prepend_bos = bool(store.attrs.get("prepend_bos", True))
    lm = model.model
    dev = model.device
    was = sae.training
    sae.eval()
    sp = Splice(sae, reads, writes, input_scale)
    variants = ["sae", "zero"] + [f"layer{j}" for j in range(sp.copies - 3)]
    B = max(1, batch_tokens // T)
    sums = {f"{p}_{v}": 0.0 for p in ("ce", "kl") for v in variants}
    sums["ce_clean"] = 0.0
    per_seq: list[np.ndarray] = []  # [b, 6] sums per sequence in DOWNSTREAM_SUMS order
    n_pred = 0
    bar = progress(total=n_seq * T, desc="ce/kl", unit="tok", quiet=quiet)
    try:
        for s in range(0, n_seq, B):
            ids = torch.from_numpy(tokens[s:s + B].astype(np.int64)).to(dev)
            b = ids.shape[0]
            sp.set_batch(torch.from_numpy(keep[s:s + B]))
            sp.prepare(lm, ids)
            with hooks(lm, sp.fns()):
                logits = lm(input_ids=ids.repeat(sp.copies, 1), use_cache=False).logits[:, :-1].float()
            mask = predicted_mask(torch.from_numpy(pos[s:s + B]), prepend_bos).to(dev)
            tgt = ids[:, 1:]
            lp_clean = F.log_softmax(logits[:b], dim=-1)
            p_clean = lp_clean.exp()
            rows = {"ce_clean": _row_sums(-lp_clean.gather(-1, tgt.unsqueeze(-1)).squeeze(-1), mask)}
            for c, name in enumerate(variants, start=1):
                lp = F.log_softmax(logits[c * b:(c + 1) * b], dim=-1)
                rows[f"ce_{name}"] = _row_sums(-lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1), mask)
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
        "ce_spliced_positions": int(keep.sum()), "ce_spliced_hook_points": writes,
    }
    if sp.acausal:
        out["ce_loss_sae_layers"] = [m[f"ce_layer{j}"] for j in range(len(writes))]
        out["kl_div_sae_layers"] = [m[f"kl_layer{j}"] for j in range(len(writes))]
    if ci is not None and enough_units(n_seq, ci, f"the CE/KL evaluation ({n_seq} {split} sequences of store "
                                                   f"{store.path!r})", f"raise --ce-tokens to {ci.min_units * T}"):
        add_intervals(out, np.concatenate(per_seq), downstream_figures, ci)
    return out


def _row_sums(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of v [S, T-1] over the masked positions (float64, on the CPU)."""
    return (v.double() * mask).sum(1).cpu()

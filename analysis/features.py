"""Feature statistics: one streaming pass over an activation store, encoding with an SAE.

    from analysis.features import feature_stats
    stats = feature_stats(sae, store, hook, split="heldout", top=20)
    stats.max_act[i], stats.density[i], stats.top_rows[i], stats.top_windows(i) ...

Memory stays bounded: the store is read chunk by chunk into sequence-aligned blocks (a sequence
never straddles two blocks, so a ±`window` context is always inside the block that holds its
centre), each block is encoded into sparse (row, latent, value) triples, and the per-latent
state is a few fixed-size buffers:

- counts, sums and maxima per latent (density = fraction of counted rows where the latent fires);
- the top-N activations per latent with their store rows, ±window tokens and the latent's values
  on those tokens (a running merge: the block's best N candidates per latent, found by sorting
  triples by (latent, −value), are concatenated to the kept N and `torch.topk` keeps N);
- a uniform reservoir sample of each latent's non-zero activations (the same merge keyed by a
  random priority), from which examples per activation quantile are drawn at the end;
- an exact activation histogram per latent over [0, upper) where `upper` is a power of two
  ≥ the running max: when the max grows, bins merge exactly (bin j → j >> t).

Windows are only built for entries that enter a top buffer, so the cost per block after warm-up
is the encoder matmul plus O(nnz log nnz) bookkeeping. Rows outside the chosen split (BOS,
outliers, or the other split) are not encoded; their values in a context window read 0.

A dictionary is encoded from what it reads: an SAE's or a transcoder's input hook point, a
crosscoder's hook points side by side (`hook` as a list), so a crosscoder's top examples are the
positions where its shared code is largest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from saeforge.errors import UserError
from saeforge.progress import progress
from collect.store import Split, Store
from sae.architectures import SAE

log = logging.getLogger(__name__)

NEG_INF = float("-inf")


# ---- sparse encoding ---------------------------------------------------------------------------

@torch.no_grad()
def encode_triples(sae: SAE, x: torch.Tensor, batch: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero latents of rows `x` [n, d_in] as (row, latent, value) triples, row-major.

    TopK SAEs (and crosscoders) take the k largest ReLU pre-activations directly (what `encode` does, without
    scattering into a dense [n, d_sae] matrix); other architectures encode `batch` rows at a time
    and keep the non-zeros."""
    rows, lats, vals = [], [], []
    arch = getattr(getattr(sae, "cfg", None), "arch", None)
    for a in range(0, x.shape[0], batch):
        xb = x[a:a + batch]
        if arch in ("topk", "crosscoder"):  # a crosscoder's code is TopK over its layers side by side
            pre = F.relu(sae.pre_acts(xb))
            v, idx = pre.topk(sae.cfg.k, dim=1, sorted=False)
            r = torch.arange(a, a + xb.shape[0], device=x.device).unsqueeze(1).expand_as(idx)
            keep = v > 0
            rows.append(r[keep])
            lats.append(idx[keep])
            vals.append(v[keep])
        else:
            f = sae.encode(xb)
            nz = f.nonzero()
            rows.append(nz[:, 0] + a)
            lats.append(nz[:, 1])
            vals.append(f[nz[:, 0], nz[:, 1]])
    if not rows:
        e = torch.empty(0, dtype=torch.int64, device=x.device)
        return e, e, torch.empty(0, device=x.device)
    return torch.cat(rows), torch.cat(lats), torch.cat(vals).float()


# ---- the per-latent state ----------------------------------------------------------------------

def _per_latent_best(lat: torch.Tensor, key: torch.Tensor, n: int, d_sae: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of each latent's `n` largest keys among the triples: (triple idx, latent, rank)."""
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(lat[order], stable=True)]
    lat_s = lat[order]
    counts = torch.bincount(lat_s, minlength=d_sae)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat_s.numel(), device=lat.device) - starts[lat_s]
    sel = rank < n
    return order[sel], lat_s[sel], rank[sel]


@dataclass
class TopBuffer:
    """Per-latent best `n` entries by `key`, each with a value, a store row and a context window."""
    d_sae: int
    n: int
    width: int
    key: torch.Tensor = field(init=False)
    val: torch.Tensor = field(init=False)
    row: torch.Tensor = field(init=False)
    tok: torch.Tensor = field(init=False)
    win: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        d, n, w = self.d_sae, self.n, self.width
        self.key = torch.full((d, n), NEG_INF)
        self.val = torch.zeros(d, n)
        self.row = torch.full((d, n), -1, dtype=torch.int64)
        self.tok = torch.full((d, n, w), -1, dtype=torch.int32)
        self.win = torch.zeros(d, n, w)

    def merge(self, lat: torch.Tensor, key: torch.Tensor, block: "Block", tri_rows: torch.Tensor,
              tri_vals: torch.Tensor) -> None:
        """Merge candidate triples (keys per triple) into the buffer; windows only for winners.

        Only triples whose key beats their latent's current N-th key can enter, so after warm-up
        almost every triple is dropped before any sorting, and only latents with an entrant are touched."""
        n = self.n
        live = (key > self.key[lat, n - 1]).nonzero().squeeze(1)
        if live.numel() == 0:
            return
        idx, l_sel, rank = _per_latent_best(lat[live], key[live], n, self.d_sae)
        idx = live[idx]
        changed = l_sel.unique()
        slot = torch.searchsorted(changed, l_sel)
        m = changed.numel()
        cand_key = torch.full((m, n), NEG_INF)
        cand_key[slot, rank] = key[idx]
        cand_idx = torch.full((m, n), -1, dtype=torch.int64)
        cand_idx[slot, rank] = idx
        new_key, p = torch.cat([self.key[changed], cand_key], 1).topk(n, dim=1)
        fn = (p >= n) & (new_key > NEG_INF)  # empty candidate slots never enter
        old_p = p.clamp(max=n - 1)  # an empty new slot lands on an empty old slot (the buffer was not full)
        val = self.val[changed].gather(1, old_p)
        row = self.row[changed].gather(1, old_p)
        tok = self.tok[changed].gather(1, old_p.unsqueeze(2).expand(-1, -1, self.width))
        win = self.win[changed].gather(1, old_p.unsqueeze(2).expand(-1, -1, self.width))
        t = cand_idx.gather(1, (p - n).clamp(min=0))[fn]  # triple index of each new winner
        local = tri_rows[t]
        val[fn] = tri_vals[t]
        row[fn] = block.rows[local]
        wt, wv = block.windows(local, lat[t], self.width // 2)
        tok[fn] = wt
        win[fn] = wv
        self.key[changed] = new_key
        self.val[changed] = val
        self.row[changed] = row
        self.tok[changed] = tok
        self.win[changed] = win


class Block:
    """A sequence-aligned run of store rows: tokens, seq and the encoded triples of its split rows."""

    def __init__(self, rows: np.ndarray, tokens: np.ndarray, seq: np.ndarray, d_sae: int,
                 tri_rows: torch.Tensor, tri_lats: torch.Tensor, tri_vals: torch.Tensor):
        self.rows = torch.from_numpy(rows.astype(np.int64))
        self.tokens = torch.from_numpy(tokens.astype(np.int32))
        self.seq = torch.from_numpy(seq.astype(np.int64))
        self.d_sae = d_sae
        self.tri_rows, self.tri_lats, self.tri_vals = tri_rows, tri_lats, tri_vals
        self._keys: torch.Tensor | None = None
        self._order: torch.Tensor | None = None

    def windows(self, local: torch.Tensor, lat: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [m, 2h+1] (−1 outside the sequence) and the latent's values on them (0 where unset)."""
        if self._keys is None:
            keys = self.tri_rows * self.d_sae + self.tri_lats
            self._keys, self._order = keys.sort()
        offs = torch.arange(-half, half + 1)
        rr = local.unsqueeze(1) + offs
        inside = (rr >= 0) & (rr < self.rows.numel())
        rc = rr.clamp(0, self.rows.numel() - 1)
        inside &= self.seq[rc] == self.seq[local].unsqueeze(1)
        tok = torch.where(inside, self.tokens[rc], torch.full_like(rc, -1, dtype=torch.int32))
        want = rc * self.d_sae + lat.unsqueeze(1)
        assert self._order is not None
        at = torch.searchsorted(self._keys, want.reshape(-1)).clamp(max=max(self._keys.numel() - 1, 0))
        if self._keys.numel():
            hit = (self._keys[at] == want.reshape(-1)).reshape(rc.shape) & inside
            v = self.tri_vals[self._order[at]].reshape(rc.shape)
            win = torch.where(hit, v, torch.zeros_like(v))
        else:
            win = torch.zeros(rc.shape)
        return tok, win


class Histogram:
    """Exact per-latent histograms of non-zero activations over [0, upper), upper a power of two."""

    def __init__(self, d_sae: int, bins: int):
        self.bins = bins
        self.counts = torch.zeros(d_sae, bins, dtype=torch.int64)
        self.upper = torch.zeros(d_sae)

    def add(self, lat: torch.Tensor, val: torch.Tensor) -> None:
        if lat.numel() == 0:
            return
        b = self.bins
        vmax = torch.zeros_like(self.upper).scatter_reduce(0, lat, val, "amax")
        fresh = (self.upper == 0) & (vmax > 0)
        if fresh.any():
            self.upper[fresh] = torch.exp2(torch.floor(torch.log2(vmax[fresh])) + 1)
        grow = (self.upper > 0) & (vmax >= self.upper)
        if grow.any():
            g = grow.nonzero().squeeze(1)
            t = (torch.floor(torch.log2(vmax[g] / self.upper[g])) + 1).long()
            for step in t.unique().tolist():
                rows = g[t == step]
                old = self.counts[rows]
                new = torch.zeros_like(old)
                new.index_add_(1, torch.arange(b) >> step, old)
                self.counts[rows] = new
                self.upper[rows] *= 2.0 ** step
        binn = (val / self.upper[lat] * b).long().clamp_(0, b - 1)
        self.counts.view(-1).index_add_(0, lat * b + binn, torch.ones_like(binn))

    def edges(self, i: int) -> np.ndarray:
        return np.linspace(0.0, float(self.upper[i]), self.bins + 1)


@dataclass
class FeatureStats:
    """What one pass over a store gives for every latent of an SAE."""
    d_sae: int
    n_rows: int  # rows counted (the split's keep rows)
    count: torch.Tensor  # [d_sae] rows where the latent fired
    sum: torch.Tensor  # [d_sae] float64 sum of activations
    top: TopBuffer  # by value
    samples: TopBuffer  # uniform reservoir (key = random priority)
    hist: Histogram
    window: int
    seconds: float = 0.0
    encode_seconds: float = 0.0

    @property
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.n_rows, 1)

    @property
    def max_act(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.top.val[:, 0], torch.zeros(self.d_sae))

    @property
    def mean_act(self) -> torch.Tensor:
        """Mean over all counted rows (zeros included)."""
        return self.sum / max(self.n_rows, 1)

    @property
    def mean_act_active(self) -> torch.Tensor:
        """Mean over the rows where the latent fired."""
        return self.sum / self.count.clamp_min(1)

    def examples(self, i: int, kind: str = "top") -> list[dict]:
        """Top examples (descending) or reservoir samples (ascending by value) of latent i:
        {row, value, token_ids (window, −1 padded), values}."""
        buf = self.top if kind == "top" else self.samples
        keep = (buf.row[i] >= 0).nonzero().squeeze(1)
        out = [{"row": int(buf.row[i, j]), "value": float(buf.val[i, j]),
                "token_ids": buf.tok[i, j].tolist(), "values": buf.win[i, j].tolist()} for j in keep.tolist()]
        if kind != "top":
            out.sort(key=lambda e: float(e["value"]))  # type: ignore[arg-type]
        return out


# ---- the pass ----------------------------------------------------------------------------------

def _hooks(hook: str | Sequence[str]) -> list[str]:
    return [hook] if isinstance(hook, str) else list(hook)


def read_inputs(store: Store, hooks: list[str], a: int, b: int, mask: np.ndarray) -> np.ndarray:
    """Rows a..b (those in mask) of the hook points, side by side ([n, len(hooks)·d])."""
    xs = [store.activations(h, a, b)[mask] for h in hooks]
    return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)


def _blocks(store: Store, hooks: list[str], split: Split, block_rows: int, quiet: bool
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, tokens, seq, mask, x of the mask rows) for sequence-aligned runs of ~block_rows."""
    ranges = store.chunk_ranges()
    buf: list[tuple] = []
    n_buf = 0
    bar = progress(total=store.n_tokens, desc="features", unit="tok", quiet=quiet)

    def emit(parts: list[tuple]) -> tuple:
        rows = np.concatenate([p[0] for p in parts])
        tokens = np.concatenate([p[1] for p in parts])
        seq = np.concatenate([p[2] for p in parts])
        mask = np.concatenate([p[3] for p in parts])
        xs = [p[4] for p in parts if p[4] is not None]
        x = np.concatenate(xs) if xs else np.zeros((0, store.d_model * len(hooks)), np.float32)
        return rows, tokens, seq, mask, x

    for a, b in ranges:
        mask = store.split_mask(split, a, b)
        x = read_inputs(store, hooks, a, b, mask) if mask.any() else None
        buf.append((np.arange(a, b), store.tokens(a, b), store.seq(a, b), mask, x))
        n_buf += b - a
        bar.update(b - a)
        if n_buf < block_rows:
            continue
        rows, tokens, seq, mask, x = emit(buf)
        cut = np.flatnonzero(seq[1:] != seq[:-1])
        if cut.size == 0:
            buf, n_buf = [(rows, tokens, seq, mask, x)], len(rows)
            continue
        c = int(cut[-1]) + 1  # start of the last (possibly unfinished) sequence
        nm = int(mask[:c].sum())
        yield rows[:c], tokens[:c], seq[:c], mask[:c], x[:nm]
        rest = (rows[c:], tokens[c:], seq[c:], mask[c:], x[nm:])
        buf, n_buf = [rest], len(rest[0])
    bar.close()
    if n_buf:
        yield emit(buf)


@torch.no_grad()
def feature_stats(sae: SAE, store: Store, hook: str | Sequence[str], split: Split = "all", top: int = 20,
                  samples: int = 16, window: int = 10, bins: int = 50, block_rows: int = 8192,
                  encode_batch: int = 1024, seed: int = 0, quiet: bool = True) -> FeatureStats:
    """One streaming pass: density, max, mean, top-N with contexts, reservoir samples, histograms.

    `hook`: the hook point the dictionary reads, or a crosscoder's hook points in its order."""
    hooks = _hooks(hook)
    for h in hooks:
        if h not in store.hooks:
            raise UserError(f"hook point {h!r} is not in store {store.path!r}; it holds {store.hooks}: "
                            f"pass the store this SAE was trained on")
    d_sae = int(sae.W_dec.shape[0])
    width = int(sae.enc.shape[1])  # what the encoder reads
    if width != store.d_model * len(hooks):
        raise UserError(f"SAE d_in {width} does not match store d_model {store.d_model}"
                        + (f" × {len(hooks)} hook points" if len(hooks) > 1 else ""))
    gen = torch.Generator().manual_seed(seed)
    span = 2 * window + 1
    st = FeatureStats(d_sae=d_sae, n_rows=0, count=torch.zeros(d_sae, dtype=torch.int64),
                      sum=torch.zeros(d_sae, dtype=torch.float64), top=TopBuffer(d_sae, top, span),
                      samples=TopBuffer(d_sae, samples, span), hist=Histogram(d_sae, bins), window=window)
    device = sae.W_dec.device
    t0 = time.perf_counter()
    for rows, tokens, seq, mask, x in _blocks(store, hooks, split, block_rows, quiet):
        st.n_rows += int(mask.sum())
        if x.shape[0] == 0:
            continue
        te = time.perf_counter()
        xr, lat, val = encode_triples(sae, torch.from_numpy(x).to(device), encode_batch)
        st.encode_seconds += time.perf_counter() - te
        xr, lat, val = xr.cpu(), lat.cpu(), val.cpu()
        if not torch.isfinite(val).all():
            raise UserError(f"store {store.path!r} hook {','.join(hooks)!r} gives NaN/inf latents near row {int(rows[0])}; "
                            f"recollect it or check the SAE")
        local = torch.from_numpy(np.flatnonzero(mask)).long()[xr]  # triple rows → block rows
        block = Block(rows, tokens, seq, d_sae, local, lat, val)
        st.count += torch.bincount(lat, minlength=d_sae)
        st.sum.index_add_(0, lat, val.double())
        st.hist.add(lat, val)
        st.top.merge(lat, val, block, local, val)
        st.samples.merge(lat, torch.rand(val.shape, generator=gen), block, local, val)
    st.seconds = time.perf_counter() - t0
    return st


@torch.no_grad()
def encode_rate(sae: SAE, store: Store, hook: str | Sequence[str], split: Split = "all", max_rows: int | None = None,
                encode_batch: int = 1024) -> tuple[int, float]:
    """The bound the stats pass is measured against: read the same rows and encode them, nothing
    else. Returns (rows encoded, seconds)."""
    device = sae.W_dec.device
    hooks = _hooks(hook)
    n, t0 = 0, time.perf_counter()
    for a, b in store.chunk_ranges():
        mask = store.split_mask(split, a, b)
        if mask.any():
            x = torch.from_numpy(read_inputs(store, hooks, a, b, mask)).to(device)
            encode_triples(sae, x, encode_batch)
            n += x.shape[0]
        if max_rows is not None and n >= max_rows:
            break
    return n, time.perf_counter() - t0

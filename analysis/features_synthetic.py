"""Synthetic feature statistics of any width, for testing and benchmarking the viewer at 65k latents
without encoding a store through a 65k-latent SAE.

Contexts are cut from a real token stream (a store's `tokens`), so their text and their
compressibility are those of real data; densities are log-uniform, activations log-normal, and a
few neighbours of each example's centre token are active too. The result goes through the same
writer (`analysis.features_io.write_features`) as real statistics.
"""
from __future__ import annotations

import numpy as np
import torch

from analysis.features import FeatureStats, Histogram, TopBuffer
from analysis.labels import LogitTable


def synthetic_stats(d_sae: int, tokens: np.ndarray, top: int = 20, samples: int = 16, window: int = 10,
                    bins: int = 50, dead_fraction: float = 0.02, seed: int = 0) -> FeatureStats:
    """FeatureStats for `d_sae` latents with contexts from `tokens` (one long stream)."""
    rng = np.random.default_rng(seed)
    n_rows, W = len(tokens), 2 * window + 1
    if n_rows < 4 * W:
        raise ValueError(f"need at least {4 * W} tokens to cut contexts from, got {n_rows}")
    density = 10.0 ** rng.uniform(-5, -1, d_sae)
    density[rng.random(d_sae) < dead_fraction] = 0.0
    count = np.minimum(np.ceil(density * n_rows), n_rows).astype(np.int64)
    count[density == 0] = 0
    vmax = rng.lognormal(1.0, 0.5, d_sae).astype(np.float32)
    offs = np.arange(-window, window + 1)

    def fill(buf: TopBuffer, n: int, key_desc: bool) -> None:
        m = np.minimum(count, n)
        slot_ok = np.arange(n)[None, :] < m[:, None]
        frac = np.sort(rng.uniform(0.2, 1.0, (d_sae, n)), axis=1)[:, ::-1] if key_desc else rng.uniform(0.05, 1.0, (d_sae, n))
        val = (frac * vmax[:, None]).astype(np.float32)
        if key_desc:
            val[:, 0] = vmax
        rows = rng.integers(window, n_rows - window, (d_sae, n))
        tok = tokens[rows[..., None] + offs].astype(np.int32)
        win = np.where(rng.random((d_sae, n, W)) < 0.12, rng.uniform(0, 1, (d_sae, n, W)) * val[..., None], 0.0)
        win[:, :, window] = val
        buf.key = torch.from_numpy(np.where(slot_ok, val if key_desc else rng.random((d_sae, n)), -np.inf).astype(np.float32))
        buf.val = torch.from_numpy(np.where(slot_ok, val, 0.0).astype(np.float32))
        buf.row = torch.from_numpy(np.where(slot_ok, rows, -1).astype(np.int64))
        buf.tok = torch.from_numpy(np.where(slot_ok[..., None], tok, -1).astype(np.int32))
        buf.win = torch.from_numpy(np.where(slot_ok[..., None], win, 0.0).astype(np.float32))

    tb, sb = TopBuffer(d_sae, top, W), TopBuffer(d_sae, samples, W)
    fill(tb, top, True)
    fill(sb, samples, False)
    hist = Histogram(d_sae, bins)
    alive = count > 0
    hist.upper = torch.from_numpy(np.where(alive, 2.0 ** np.ceil(np.log2(np.maximum(vmax, 1e-6)) + 1e-9), 0.0)
                                  .astype(np.float32))
    h = rng.dirichlet(np.ones(bins) * 0.3, d_sae) * count[:, None]
    hist.counts = torch.from_numpy(np.round(h).astype(np.int64))
    mean_active = vmax * 0.45
    return FeatureStats(d_sae=d_sae, n_rows=n_rows, count=torch.from_numpy(count),
                        sum=torch.from_numpy((count * mean_active).astype(np.float64)), top=tb, samples=sb,
                        hist=hist, window=window)


def synthetic_logits(d_sae: int, vocab_size: int, top: int = 10, bins: int = 40, seed: int = 0) -> LogitTable:
    """Random top/bottom output tokens and logit histograms of the right shapes."""
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, vocab_size, (d_sae, top))
    neg = rng.integers(0, vocab_size, (d_sae, top))
    pv = -np.sort(-rng.lognormal(0, 0.3, (d_sae, top)), axis=1)
    nv = np.sort(-rng.lognormal(0, 0.3, (d_sae, top)), axis=1)
    hh = rng.integers(0, vocab_size // bins, (d_sae, bins))
    return LogitTable(torch.from_numpy(pos), torch.from_numpy(pv).float(), torch.from_numpy(neg),
                      torch.from_numpy(nv).float(), torch.from_numpy(hh), torch.from_numpy(nv[:, 0]).float(),
                      torch.from_numpy(pv[:, 0]).float())

"""Synthetic activation stores with real sparse structure, for tests and benchmarks.

x = sparse non-negative codes @ random unit dictionary + noise (+ an offset), so a working SAE
must find the dictionary: loss goes down and held-out FVU falls well below 1.
"""
from __future__ import annotations

import numpy as np

from collect.store import ShardPlan, Store, StoreWriter


def synthetic_rows(n: int, d: int, n_features: int, active: int, seed: int = 0, noise: float = 0.05,
                   scale: float = 3.0) -> np.ndarray:
    """n rows of `active`-sparse combinations of n_features unit directions (fixed by seed)."""
    dict_rng = np.random.default_rng(12345)
    D = dict_rng.standard_normal((n_features, d)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    offset = dict_rng.standard_normal(d).astype(np.float32) * 0.5
    rng = np.random.default_rng(seed)
    # Zipf-like feature frequencies, like real features
    p = 1.0 / np.arange(1, n_features + 1) ** 0.6
    p /= p.sum()
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 8192):  # chunks keep the [rows, active, d] gather small
        m = min(8192, n - s)
        idx = np.argsort(rng.random((m, n_features)) ** (1.0 / p), axis=1)[:, -active:] if n_features <= 256 \
            else rng.choice(n_features, size=(m, active), p=p)
        vals = rng.exponential(1.0, size=(m, active)).astype(np.float32)
        x[s:s + m] = np.einsum("na,nad->nd", vals, D[idx]) + noise * rng.standard_normal((m, d)).astype(np.float32)
    return ((x + offset) * scale).astype(np.float32)


def write_synthetic_store(path: str, n_tokens: int = 16384, d: int = 32, n_features: int = 128, active: int = 4,
                          hook: str = "layers.0.resid_post", context: int = 64, shard_rows: int = 2048,
                          heldout_every: int = 8, drop_every: int = 16, dtype: str = "float32", seed: int = 0,
                          rows: np.ndarray | None = None) -> Store:
    """Write a complete store; every `heldout_every`-th sequence is held out, every `drop_every`-th
    row has keep=False (and a huge norm, so training on it would show)."""
    plan = ShardPlan.for_rows(context, d * 4, shard_rows=shard_rows)
    attrs = {"hook_points": [hook], "d_model": d, "dtype": dtype, "context": context, "model": "synthetic",
             "model_hash": "synthetic-0", "tokenizer": "none", "corpus": "synthetic", "config": {},
             "prepend_bos": False, "hook_modules": {hook: "model.layers.0"}, "model_class": "synthetic"}
    w = StoreWriter(path, attrs, plan)
    x = synthetic_rows(n_tokens, d, n_features, active, seed=seed) if rows is None else rows
    seq = np.arange(n_tokens) // context
    keep = (np.arange(n_tokens) % drop_every) != 0
    x = x.copy()
    if rows is None:
        x[~keep] *= 100.0
    held = (seq % heldout_every) == heldout_every - 1
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    for s in range(0, n_tokens, plan.shard_rows):
        e = min(s + plan.shard_rows, n_tokens)
        w.write(s, {hook: x[s:e].astype(np_dtype), "tokens": np.arange(s, e, dtype=np.int32),
                    "seq": seq[s:e].astype(np.int64), "pos": (np.arange(s, e) % context).astype(np.int32),
                    "keep": keep[s:e], "heldout": held[s:e]})
    w.finish()
    return Store.open(path)

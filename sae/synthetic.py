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
    D, offset = planted_dictionary(d, n_features)
    return planted_rows(n, [D], [offset], active, seed=seed, noise=noise, scale=scale)[0]


def planted_dictionary(d: int, n_features: int, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """([n_features, d] unit feature directions, [d] offset), fixed by seed: the ground truth."""
    dict_rng = np.random.default_rng(seed)
    D = dict_rng.standard_normal((n_features, d)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return D, dict_rng.standard_normal(d).astype(np.float32) * 0.5


def planted_rows(n: int, dicts: list[np.ndarray], offsets: list[np.ndarray], active: int, seed: int = 0,
                 noise: float = 0.05, scale: float = 3.0) -> list[np.ndarray]:
    """Rows of several spaces that share one sparse code: space j gets codes @ dicts[j] + offsets[j] + noise.

    Feature i fires with Zipf-like frequency ∝ 1/(i+1)^0.6 (feature 0 most often), like real features.
    One space is an SAE's data; two are a transcoder's input and target (a planted sparse map x → y);
    L are a crosscoder's layers."""
    n_features = dicts[0].shape[0]
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_features + 1) ** 0.6
    p /= p.sum()
    out = [np.empty((n, D.shape[1]), dtype=np.float32) for D in dicts]
    for s in range(0, n, 8192):  # chunks keep the [rows, active, d] gather small
        m = min(8192, n - s)
        idx = np.argsort(rng.random((m, n_features)) ** (1.0 / p), axis=1)[:, -active:] if n_features <= 256 \
            else rng.choice(n_features, size=(m, active), p=p)
        vals = rng.exponential(1.0, size=(m, active)).astype(np.float32)
        for x, D in zip(out, dicts):
            x[s:s + m] = np.einsum("na,nad->nd", vals, D[idx]) + noise * rng.standard_normal((m, D.shape[1])).astype(np.float32)
    return [((x + o) * scale).astype(np.float32) for x, o in zip(out, offsets)]


def write_synthetic_store(path: str, n_tokens: int = 16384, d: int = 32, n_features: int = 128, active: int = 4,
                          hook: str = "layers.0.resid_post", context: int = 64, shard_rows: int = 2048,
                          heldout_every: int = 8, drop_every: int = 16, dtype: str = "float32", seed: int = 0,
                          rows: np.ndarray | dict[str, np.ndarray] | None = None) -> Store:
    """Write a complete store; every `heldout_every`-th sequence is held out, every `drop_every`-th
    row has keep=False (and a huge norm, so training on it would show). `rows` as {hook: rows} writes
    several hook points (all of width d)."""
    by_hook = rows if isinstance(rows, dict) else {hook: rows}
    plan = ShardPlan.for_rows(context, d * 4 * len(by_hook), shard_rows=shard_rows)
    attrs = {"hook_points": list(by_hook), "d_model": d, "dtype": dtype, "context": context, "model": "synthetic",
             "model_hash": "synthetic-0", "tokenizer": "none", "corpus": "synthetic", "config": {},
             "prepend_bos": False, "hook_modules": {h: "model.layers.0" for h in by_hook},
             "hook_outputs": {h: "model.layers.0" for h in by_hook}, "model_class": "synthetic"}
    w = StoreWriter(path, attrs, plan)
    seq = np.arange(n_tokens) // context
    keep = (np.arange(n_tokens) % drop_every) != 0
    xs = {}
    for h, r in by_hook.items():
        xs[h] = synthetic_rows(n_tokens, d, n_features, active, seed=seed) if r is None else r.copy()
        if r is None:
            xs[h][~keep] *= 100.0
    held = (seq % heldout_every) == heldout_every - 1
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    for s in range(0, n_tokens, plan.shard_rows):
        e = min(s + plan.shard_rows, n_tokens)
        w.write(s, {**{h: x[s:e].astype(np_dtype) for h, x in xs.items()}, "tokens": np.arange(s, e, dtype=np.int32),
                    "seq": seq[s:e].astype(np.int64), "pos": (np.arange(s, e) % context).astype(np.int32),
                    "keep": keep[s:e], "heldout": held[s:e]})
    w.finish()
    return Store.open(path)

"""A small features directory made by the real pipeline on a synthetic store (no model needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.features import build_records, feature_stats, write_features
from analysis.labels import LogitTable
from collect.store import ShardPlan, Store, StoreWriter
from sae.architectures import ArchConfig, build_sae

VOCAB = [f"tok{i}" for i in range(50)] + [" the", " cat", "\n", "\t", " <b>&", "  ", " é"]


def synthetic_store(path: Path, n_seq: int = 24, context: int = 32, d: int = 16, seed: int = 0) -> Store:
    rng = np.random.default_rng(seed)
    n = n_seq * context
    attrs = {"hook_points": ["layers.0.resid_post"], "d_model": d, "dtype": "float32", "context": context,
             "model": "synthetic", "model_hash": "0" * 32, "tokenizer": "synthetic"}
    w = StoreWriter(str(path), attrs, ShardPlan(chunk_rows=context, shard_rows=n))
    tokens = rng.integers(0, len(VOCAB), n).astype(np.int32)
    emb = rng.normal(size=(len(VOCAB), d)).astype(np.float32)
    x = emb[tokens] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    keep = np.ones(n, bool)
    keep[::context] = False  # BOS-like first rows
    w.write(0, {"layers.0.resid_post": x, "tokens": tokens, "seq": np.repeat(np.arange(n_seq), context),
                "pos": np.tile(np.arange(context), n_seq).astype(np.int32), "keep": keep,
                "heldout": np.zeros(n, bool)})
    w.finish()
    return Store.open(path)


def fake_features(out: Path, d_sae: int = 40) -> None:
    store = synthetic_store(out / "store.zarr")
    torch.manual_seed(0)
    sae = build_sae(ArchConfig(arch="topk", d_in=16, d_sae=d_sae, k=3)).eval()
    with torch.no_grad():
        sae.b_enc[-3:] = -100.0  # three latents that never fire
    st = feature_stats(sae, store, "layers.0.resid_post", split="all", top=8, samples=8)
    V = len(VOCAB)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(d_sae, V, generator=g)
    pv, pi = logits.topk(10, dim=1)
    nv, ni = logits.topk(10, dim=1, largest=False)
    lt = LogitTable(pi, pv, ni, nv, torch.randint(0, 9, (d_sae, 20), generator=g), logits.min(1).values,
                    logits.max(1).values)
    index, records = build_records(st, VOCAB, lt)
    meta = {"sae": {"hook_point": "layers.0.resid_post", "architecture": "topk", "d_sae": d_sae},
            "store": {"path": str(out / "store.zarr"), "split": "all", "rows_counted": st.n_rows}, "model": "synthetic"}
    write_features(out, meta, index, records)

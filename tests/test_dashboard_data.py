"""A small features directory made by the real pipeline on a synthetic store (no model needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.dashboard import install_viewer
from analysis.features import feature_stats
from analysis.features_io import write_features
from analysis.labels import LogitTable
from collect.store import ShardPlan, Store, StoreWriter
from sae.architectures import ArchConfig, build_sae

XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>"]
VOCAB = [f"tok{i}" for i in range(50)] + [" the", " cat", "\n", "\t", " <b>&", "  ", " é"] + XSS
HOOK = "layers.0.resid_post"


def synthetic_store(path: Path, n_seq: int = 24, context: int = 32, d: int = 16, seed: int = 0) -> Store:
    rng = np.random.default_rng(seed)
    n = n_seq * context
    attrs = {"hook_points": [HOOK], "d_model": d, "dtype": "float32", "context": context,
             "model": "synthetic", "model_hash": "0" * 32, "tokenizer": "synthetic"}
    w = StoreWriter(str(path), attrs, ShardPlan(chunk_rows=context, shard_rows=n))
    tokens = rng.integers(0, len(VOCAB), n).astype(np.int32)
    emb = rng.normal(size=(len(VOCAB), d)).astype(np.float32)
    x = emb[tokens] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    keep = np.ones(n, bool)
    keep[::context] = False  # BOS-like first rows
    w.write(0, {HOOK: x, "tokens": tokens, "seq": np.repeat(np.arange(n_seq), context),
                "pos": np.tile(np.arange(context), n_seq).astype(np.int32), "keep": keep,
                "heldout": np.zeros(n, bool)})
    w.finish()
    return Store.open(path)


def synthetic_sae(d_sae: int = 40, d_in: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(ArchConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=3)).eval()
    with torch.no_grad():
        sae.b_enc[-3:] = -100.0  # three latents that never fire
    return sae


def fake_logits(d_sae: int, seed: int = 1) -> LogitTable:
    V = len(VOCAB)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(d_sae, V, generator=g)
    pv, pi = logits.topk(10, dim=1)
    nv, ni = logits.topk(10, dim=1, largest=False)
    return LogitTable(pi, pv, ni, nv, torch.randint(0, 9, (d_sae, 20), generator=g), logits.min(1).values,
                      logits.max(1).values)


def fake_features(out: Path, d_sae: int = 40, shard_size: int = 16, sae_dir: Path | None = None) -> None:
    """DIR with the data and the viewer; with `sae_dir`, the SAE is saved there and recorded."""
    store = synthetic_store(out / "store.zarr")
    sae = synthetic_sae(d_sae)
    st = feature_stats(sae, store, HOOK, split="all", top=8, samples=8)
    sae_meta = {"hook_point": HOOK, "architecture": "topk", "d_sae": d_sae}
    if sae_dir is not None:
        from sae.io import save_sae
        save_sae(sae, sae_dir, meta={"hook_point": HOOK, "model": "synthetic", "model_hash": "0" * 32})
        sae_meta["path"] = str(sae_dir)
    meta = {"sae": sae_meta, "store": {"path": str(out / "store.zarr"), "split": "all", "rows_counted": st.n_rows},
            "model": "synthetic", "window": 10}
    write_features(out, st, VOCAB, fake_logits(d_sae), meta, shard_size=shard_size)
    install_viewer(out)

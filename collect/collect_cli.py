"""`saeforge collect [CONFIG] --model … --corpus … --hooks … --out STORE.zarr`

Under `torchrun --nproc-per-node N` every rank collects its own slice into its own part of the
store; only rank 0 prints the summary (the other ranks return once their part is done)."""
from __future__ import annotations

from typing import Sequence

from collect.collector import CollectConfig, collect_activations
from saeforge.config import parse_config
from saeforge.dist import rank_env


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(CollectConfig, argv, section="collect", prog="saeforge collect",
                          description="Collect hook-point activations of a causal LM over a corpus into a Zarr store.")
    store = collect_activations(cfg)
    if not rank_env().is_main:
        return 0
    parts = f" in {store.n_parts} parts" if store.n_parts > 1 else ""
    print(f"{store.path}: {store.n_tokens:,} tokens × {len(store.hooks)} hook point(s) "
          f"{store.hooks}, d_model {store.d_model}, {store.dtype}, complete={store.complete}{parts}")
    return 0

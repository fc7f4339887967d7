"""`saeforge collect [CONFIG] --model … --corpus … --hooks … --out STORE.zarr`"""
from __future__ import annotations

from typing import Sequence

from collect.collector import CollectConfig, collect_activations
from collect.config import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(CollectConfig, argv, section="collect", prog="saeforge collect",
                          description="Collect hook-point activations of a causal LM over a corpus into a Zarr store.")
    store = collect_activations(cfg)
    print(f"{store.path}: {store.n_tokens:,} tokens × {len(store.hooks)} hook point(s) "
          f"{store.hooks}, d_model {store.d_model}, {store.dtype}, complete={store.complete}")
    return 0

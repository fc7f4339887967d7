"""`saeforge train [CONFIG.toml] --store S.zarr --hook H --arch topk --k 32 --expansion 8 …`.

List values (`--k 16,32`) train a sweep of SAEs from one pass over the data. Data parallel:
`torchrun --nproc-per-node N -m sae train …` (or `torchrun --nproc-per-node N $(which saeforge) train …`).
"""
from __future__ import annotations

import sys
from typing import Sequence

from saeforge.config import parse_config
from sae.config import TrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(TrainConfig, argv, section="train", prog="saeforge train",
                          description="train sparse autoencoders on an activation store")
    from sae.trainer import train
    res = train(cfg)
    from sae.distributed import env_info
    if not env_info().is_main:  # under torchrun rank 0 reports
        return 130 if res.interrupted else 0
    if res.interrupted:
        print(f"interrupted after {res.tokens:,} tokens; checkpoint in {cfg.out}. "
              f"Continue with the same command plus --resume", file=sys.stderr)
        return 130
    for path, (name, m) in zip(res.out_dirs, res.metrics.items()):
        if "heldout_fvu" not in m:
            print(f"{path}: last-batch train FVU {m.get('train_fvu', float('nan')):.4f}; the store has no held-out "
                  f"rows, so there are no held-out metrics (collect with --heldout-fraction > 0, or run "
                  f"`saeforge eval {path} --split all` on rows the SAE trained on)")
            continue
        print(f"{path}: held-out FVU {m['heldout_fvu']:.4f}, L0 {m.get('heldout_l0', float('nan')):.1f}, "
              f"dead {m.get('heldout_dead_fraction', float('nan')):.3f}")
    print(f"{res.tokens:,} tokens at {res.tokens_per_s:,.0f} tokens/s")
    return 0

"""Time per part of `saeforge eval --suite full` on one SAE, against the 15-minute budget.

    python bench/eval.py runs/quickstart/sae [--store runs/quickstart/store.zarr] [--threads 2] [eval flags…]

Runs the full suite once through its own code at its defaults (results go to a temporary folder
unless `--out DIR/eval.json` is given; the SAE's eval.json is left alone) and prints each part's seconds and share of the total. The
parts that run the model (load, CE/KL, probing and word activations) are shared by every SAE of
one `saeforge eval A B C` command; the per-SAE parts are reconstruction, probing and absorption.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saeforge.config import parse_config  # noqa: E402
from sae.eval_run import EvalConfig, run_eval  # noqa: E402

BUDGET_S = 15 * 60


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print(__doc__)
        return 2
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = [] if "--out" in args else ["--out", os.path.join(tmp, "eval.json")]  # --out DIR/eval.json keeps the report
        cfg, _ = parse_config(EvalConfig, [*args, "--suite", "full", "--wandb", "disabled", "--quiet", *out],
                              section="eval", prog="bench/eval.py")
        import torch
        threads = cfg.threads or torch.get_num_threads()
        t0 = time.perf_counter()
        res, _ = run_eval(cfg, strict=True)
        total = time.perf_counter() - t0
    m = res["metrics"]
    print(f"full suite on {cfg.sae}: d_sae {m.get('d_sae')}, {m.get('n_rows'):,} held-out rows, "
          f"{threads} torch threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'part':<24} {'seconds':>9} {'share':>7}")
    for part, s in res["timings"].items():
        print(f"{part:<24} {s:>9.1f} {s / total:>7.1%}")
    print(f"{'total (wall)':<24} {total:>9.1f} {total / BUDGET_S:>7.1%} of the 15-minute budget")
    print(f"probing mean top-1 / raw: {m.get('probe_mean_top1_acc', float('nan')):.3f} / "
          f"{m.get('probe_mean_raw_acc', float('nan')):.3f}; absorption (full, fraction): "
          f"{m.get('absorption_full_absorption_rate', float('nan')):.3f}, "
          f"{m.get('absorption_absorption_fraction', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

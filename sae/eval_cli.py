"""`saeforge eval SAE_DIR [MORE_DIRS…] [--suite basic|full] [--compare] [--store S.zarr] [--tokens N] …`.

Prints a table (every estimated figure as `value ± half-width` of its bootstrap 95% interval),
writes SAE_DIR/eval.json (+ eval_report.md and eval_plots/ with --suite full) and, when cfg.json
records a wandb run id, logs the metrics to that run (resumed with `wandb.init(id=..., resume="allow")`,
offline by default). Several SAEs are evaluated in turn; `--compare` puts them side by side.
"""
from __future__ import annotations

from typing import Any, Sequence

from saeforge.config import parse_config
from sae.eval_report import pm
from sae.eval_run import EvalConfig, run_evals


ROWS = [
    ("reconstruction (keep rows)", None),
    ("fvu", "FVU  Σ‖x−x̂‖²/Σ‖x−x̄‖²"), ("explained_variance", "explained variance 1−FVU"),
    ("mse", "MSE per element"), ("sq_err_per_token", "‖x−x̂‖² per token"), ("cossim", "cosine(x, x̂)"),
    ("l2_ratio", "‖x̂‖/‖x‖"), ("n_rows", "rows"),
    ("with norm outliers / all rows", None),
    ("with_outliers_fvu", "FVU keep + norm outliers"), ("n_outlier_rows", "norm-outlier rows"), ("n_outlier_rows_at_pos0", "  of which at pos 0 (BOS)"),
    ("all_rows_fvu", "FVU every row (BOS, specials too)"), ("all_rows_n_rows", "rows"),
    ("sparsity", None),
    ("l0", "L0 (active latents/token)"), ("dead_fraction", "dead latents (never fired)"),
    ("dense_fraction", "dense latents (>10% of tokens)"),
    ("downstream (model with SAE spliced in)", None),
    ("ce_loss_clean", "CE clean"), ("ce_loss_sae", "CE with SAE"), ("ce_loss_zero", "CE zero-ablated"),
    ("ce_loss_score", "CE loss recovered"), ("kl_div_sae", "KL(clean‖SAE)"), ("kl_div_zero", "KL(clean‖zero)"),
    ("kl_div_score", "KL score"), ("ce_positions", "predicted positions"),
    ("sparse probing (held-out accuracy, mean over tasks)", None),
    ("probe_mean_raw_acc", "probe on raw activations"),
    *((f"probe_mean_top{k}_acc", f"probe on top-{k} SAE latents") for k in (1, 2, 5, 10, 20, 50)),
    ("feature absorption (first letter)", None),
    ("absorption_full_absorption_rate", "full-absorption rate"), ("absorption_absorption_fraction", "absorption fraction"),
]


def format_table(m: dict[str, Any]) -> str:
    lines = []
    header = None
    for key, label in ROWS:
        if label is None:
            header = key
            continue
        if key not in m:
            continue
        if header is not None:
            lines.append(f"\n{header}")
            header = None
        lines.append(f"  {label:<36} {pm(m, key, 6):>24}")
    lines += _list_rows(m)
    h = m.get("latent_density_hist")
    if h:
        lines.append("\nlatent density (log10 bins)")
        lines.append(f"  {'dead':<36} {h['dead']:>24,}")
        e = h["log10_edges"]
        for i, c in enumerate(h["counts"]):
            if c:
                close = "]" if i == len(h["counts"]) - 1 else ")"
                lines.append(f"  [{e[i]:+.1f}, {e[i + 1]:+.1f}{close}{'':<24} {c:>24,}")
    return "\n".join(lines).lstrip("\n")


def _list_rows(m: dict[str, Any]) -> list[str]:
    """Per-prefix (Matryoshka) and per-layer (crosscoder) figures, one line each."""
    lines: list[str] = []
    if m.get("prefix_fvu"):
        lines.append("\nnested prefixes (Matryoshka)")
        lines += [f"  {f'FVU first {n:,} latents':<36} {v:>14.6g}" for n, v in zip(m["prefix_sizes"], m["prefix_fvu"])]
    hooks = m.get("hook_points") or []
    for key, what in (("layer_fvu", "FVU"), ("ce_loss_sae_layers", "CE, this layer alone spliced"),
                      ("kl_div_sae_layers", "KL, this layer alone spliced")):
        if m.get(key):
            lines.append(f"\nper layer: {what}")
            lines += [f"  {h:<36} {v:>14.6g}" for h, v in zip(hooks, m[key])]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(EvalConfig, argv, section="eval", prog="saeforge eval",
                          description="evaluate SAEs: reconstruction, sparsity, CE loss recovered and KL with the "
                                      "SAE spliced into the model (--suite full: + sparse probing, feature absorption "
                                      "and a report), every figure with a bootstrap 95% interval")
    results = run_evals(cfg, strict=True)
    for result, out in results:
        if len(results) > 1:
            print(f"\n== {result['sae_dir']}")
        print(format_table(result["metrics"]))
        if result.get("report"):
            print(f"\nreport {result['report']}")
        print(f"\nwrote {out}" + (f"; logged to wandb run {result['wandb_run_id']}" if result.get("wandb_run_id") else ""))
    if cfg.compare:
        from sae.eval_compare import compare, format_compare, write_compare
        cmp = compare([r for r, _ in results])
        print("\n" + format_compare(cmp))
        print(f"\nwrote {write_compare(cmp, cfg.compare_dir)}")
    return 0

"""`saeforge eval SAE_DIR [--store S.zarr] [--tokens N] [--ce-tokens N] [--device cpu]`.

Prints a table, writes SAE_DIR/eval.json and, when cfg.json records a wandb run id, logs the
metrics to that run (resumed with `wandb.init(id=..., resume="allow")`, offline by default).
"""
from __future__ import annotations

from typing import Any, Sequence

from saeforge.config import parse_config
from sae.eval_run import EvalConfig, run_eval


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
        v = m[key]
        s = "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.6g}")
        lines.append(f"  {label:<36} {s:>14}")
    lines += _list_rows(m)
    h = m.get("latent_density_hist")
    if h:
        lines.append("\nlatent density (log10 bins)")
        lines.append(f"  {'dead':<36} {h['dead']:>14,}")
        e = h["log10_edges"]
        for i, c in enumerate(h["counts"]):
            if c:
                close = "]" if i == len(h["counts"]) - 1 else ")"
                lines.append(f"  [{e[i]:+.1f}, {e[i + 1]:+.1f}{close}{'':<24} {c:>14,}")
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
                          description="evaluate an SAE: reconstruction, sparsity, CE loss recovered and KL with the "
                                      "SAE spliced into the model")
    result, out = run_eval(cfg)
    print(format_table(result["metrics"]))
    print(f"\nwrote {out}" + (f"; logged to wandb run {result['wandb_run_id']}" if result["wandb_run_id"] else ""))
    return 0

"""Bootstrap intervals of the reconstruction and downstream figures from per-sequence sums.

The streamed evaluation (`sae.evaluate`, `sae.splice`) keeps, per held-out sequence, the sums its
figures are ratios of; here they are resampled (`sae.bootstrap`) and every figure is recomputed
from the resampled sums exactly as its point estimate is:

    FVU = Σ‖x − x̂‖² / (Σ‖x‖² − ‖Σx‖²/n)     (the pooled variance of the resampled rows)
    CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean), each CE = Σ loss / Σ positions
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sae.bootstrap import BootstrapSpec, UnitSums, add_intervals

ROW_SETS = ("", "with_outliers_", "all_rows_")  # keep rows, keep + norm outliers, every row
MAIN_ONLY = ("cos", "l2r", "active", "fires")


def reconstruction_units(units: UnitSums, d: int, with_outliers: bool) -> tuple[np.ndarray, dict[str, slice]]:
    """Per-unit sums packed as columns, and where each named sum sits."""
    cols, layout, at = [], {}, 0
    names = [p + s for p in ROW_SETS if with_outliers or p != "with_outliers_" for s in ("n", "sq", "s2", "s1")]
    for name in [*names, *MAIN_ONLY]:
        a = units.units(name).astype(np.float64)
        a = a.reshape(len(a), -1)
        layout[name] = slice(at, at + a.shape[1])
        at += a.shape[1]
        cols.append(a)
    return np.concatenate(cols, axis=1), layout


def _reconstruction_figures(sums: np.ndarray, layout: dict[str, slice], d: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for p in ROW_SETS:
            if p + "n" not in layout:
                continue
            n = sums[:, layout[p + "n"]][:, 0]
            sq = sums[:, layout[p + "sq"]][:, 0]
            var = sums[:, layout[p + "s2"]][:, 0] - (sums[:, layout[p + "s1"]] ** 2).sum(1) / n
            fvu = sq / var
            out[p + "fvu"], out[p + "explained_variance"], out[p + "mse"] = fvu, 1 - fvu, sq / (n * d)
            if p == "":
                out["sq_err_per_token"] = sq / n
                out["cossim"] = sums[:, layout["cos"]][:, 0] / n
                out["l2_ratio"] = sums[:, layout["l2r"]][:, 0] / n
                out["l0"] = sums[:, layout["active"]][:, 0] / n
                fires = sums[:, layout["fires"]]
                out["dead_fraction"] = (fires == 0).mean(1)
                out["dense_fraction"] = (fires / n[:, None] > 0.1).mean(1)
    return out


def add_reconstruction_intervals(out: dict[str, Any], units: UnitSums, d: int, spec: BootstrapSpec) -> None:
    """`<figure>_ci95` for FVU, explained variance, MSE, cosine, ‖x̂‖/‖x‖, L0, dead and dense fractions."""
    with_outliers = out.get("with_outliers_fvu") is not None
    packed, layout = reconstruction_units(units, d, with_outliers)
    add_intervals(out, packed, lambda s: _reconstruction_figures(s, layout, d), spec)


DOWNSTREAM_SUMS = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "n_pred")


def downstream_figures(sums: np.ndarray) -> dict[str, np.ndarray]:
    """CE/KL figures from [B, 6] sums in DOWNSTREAM_SUMS order (the same formulas as `sae.splice`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m = {k: sums[:, i] / sums[:, 5] for i, k in enumerate(DOWNSTREAM_SUMS[:5])}
        return {"ce_loss_clean": m["ce_clean"], "ce_loss_sae": m["ce_sae"], "ce_loss_zero": m["ce_zero"],
                "ce_loss_increase": m["ce_sae"] - m["ce_clean"],
                "ce_loss_score": (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"]),
                "kl_div_sae": m["kl_sae"], "kl_div_zero": m["kl_zero"],
                "kl_div_score": (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"]}

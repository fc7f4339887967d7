"""Data-dependent initialisation: input scale and the decoder bias."""
from __future__ import annotations

import torch


def unit_norm_scale(x: torch.Tensor) -> float:
    """Factor s with mean ‖s·x‖² = 1 (estimated on a sample), so hyperparameters transfer across models."""
    ms = float(x.double().pow(2).sum(1).mean())
    return 1.0 / max(ms, 1e-30) ** 0.5


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations: the point minimising the summed distance to the rows (robust b_dec)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = float((y_new - y).norm()) <= tol * max(float(y.norm()), 1e-12)
        y = y_new
        if done:
            break
    return y.float()

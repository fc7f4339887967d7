"""Cheap reconstruction metrics used during training (full evaluation lives elsewhere)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.architectures import SAE


@dataclass
class ReconstructionMetrics:
    fvu: float  # Σ‖x̂−x‖² / Σ‖x−mean‖² over the evaluation rows
    mse: float  # mean over rows of ‖x̂−x‖²
    l0: float  # mean active latents per row
    dead_fraction: float  # latents that never fired on these rows
    n_rows: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


@torch.no_grad()
def evaluate_reconstruction(sae: SAE, x: torch.Tensor, batch_size: int = 2048) -> ReconstructionMetrics:
    """FVU, L0 and dead fraction of `sae` on rows x (in the SAE's input units), inference rule."""
    was_training = sae.training
    sae.eval()
    try:
        mean = x.mean(0, keepdim=True)
        sq_err = 0.0
        var = float((x - mean).pow(2).sum())
        l0 = 0.0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            f = sae.encode(xb)
            recon = sae.decode(f)
            sq_err += float((recon - xb).pow(2).sum())
            act = f > 0
            l0 += float(act.sum())
            fired |= act.any(0)
    finally:
        sae.train(was_training)
    n = max(len(x), 1)
    return ReconstructionMetrics(fvu=sq_err / max(var, 1e-12), mse=sq_err / n, l0=l0 / n,
                                 dead_fraction=1.0 - float(fired.float().mean()), n_rows=len(x))

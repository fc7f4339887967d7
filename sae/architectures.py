"""SAE architectures behind one interface, looked up by name in `ARCHITECTURES`.

Every SAE has the same parameters (`enc` [d_sae, d_in] = W_encᵀ, `b_enc`, `W_dec` [d_sae, d_in],
`b_dec`, optional `threshold`), `encode(x) -> latents`, `decode(latents) -> x̂` and
`forward(x, dead_mask) -> SAEOutput` with the reconstruction, loss and its terms. The encoder is
stored latent-major so the sparse kernels can address one latent's row; `W_enc` gives the
[d_in, d_sae] view of the file format.

Loss is the fraction of variance unexplained (FVU): Σ‖x̂−x‖² / Σ‖x−mean(x)‖² over the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sae.sparse_ops import SparseCodes, sparse_autoencode, sync_free, topk_autoencode


@dataclass
class ArchConfig:
    """Shape and loss hyperparameters of one SAE (what a saved SAE needs to be rebuilt)."""

    arch: str
    d_in: int
    d_sae: int
    k: int = 32  # topk / batchtopk: active latents per token
    aux_k: int | None = None  # AuxK latents (default d_in // 2)
    aux_coef: float = 1 / 32
    l1_coef: float = 5.0  # relu: L1 weighted by decoder norm (Anthropic's λ; applied as λ/√d_in)
    l0_coef: float = 1e-3  # jumprelu: L0 penalty
    bandwidth: float = 1e-3  # jumprelu: straight-through kernel width
    init_threshold: float = 1e-3  # jumprelu
    threshold_momentum: float = 0.99  # batchtopk: EMA of the smallest selected activation


@dataclass
class SAEOutput:
    recon: torch.Tensor  # [B, d_in]
    loss: torch.Tensor  # scalar to minimise
    terms: dict[str, torch.Tensor]  # detached scalars: fvu, aux, l1, l0_loss...
    l0: torch.Tensor  # mean active latents per row (detached)
    fire_counts: torch.Tensor  # int [d_sae]: rows in which each latent fired
    latents: SparseCodes | torch.Tensor  # sparse for topk-style training, dense otherwise


def fvu(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ‖x̂−x‖² / Σ‖x−mean(x)‖² (1.0 = no better than predicting the batch mean)."""
    var = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (recon - x).pow(2).sum() / var


class SAE(nn.Module):
    """Shared parameters, initialisation, decoder-norm maintenance and scale folding."""

    name: ClassVar[str] = "base"
    unit_norm_decoder: ClassVar[bool] = True
    has_threshold: ClassVar[bool] = False  # a threshold buffer (batchtopk)
    saves_threshold: ClassVar[bool] = False  # `threshold` goes into sae.safetensors

    def __init__(self, cfg: ArchConfig, b_dec: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        w = torch.randn(n, d, generator=generator).to(device)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.enc = nn.Parameter(w.clone())  # W_enc = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device) if b_dec is None else b_dec.clone().float().to(device))
        if self.has_threshold:
            self.register_buffer("threshold", torch.zeros(n, device=device))

    @property
    def W_enc(self) -> torch.Tensor:
        """[d_in, d_sae] view (the file format's layout)."""
        return self.enc.t()

    # ---- interface -------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_dec, self.enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [..., d_sae] of raw inputs [..., d_in] (inference rule)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        raise NotImplementedError

    # ---- training helpers ------------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component that would change decoder row norms."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x·scale take raw x: latents and outputs become raw-unit.

        pre(x·s) = s·(x − b_dec/s)·W_enc + b_enc, so dividing b_enc, b_dec and the threshold by s
        gives latents f/s for raw x, and decoding them with the unchanged unit-norm W_dec plus b_dec/s
        yields x̂/s. Decoder rows keep their norm (and their interpretation).
        """
        self.b_enc /= scale
        self.b_dec /= scale
        if self.has_threshold:
            self.threshold /= scale
        self._fold_extra(scale)

    def _fold_extra(self, scale: float) -> None:
        pass


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


class TopKSAE(SAE):
    """TopK(ReLU) with AuxK on dead latents; sparse decoder and sparse backward."""

    name = "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf, lead = _flat(x)
        pre = F.relu(self.pre_acts(xf))
        vals, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
        return pre.new_zeros(pre.shape).scatter_(1, idx, vals).reshape(*lead, -1)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        xc = x - self.b_dec
        codes, recon, pre = topk_autoencode(xc, self.enc, self.b_enc, self.W_dec, self.cfg.k)
        return _with_aux(self, x, xc, recon + self.b_dec, codes, pre, dead_mask)


def _with_aux(sae: SAE, x: torch.Tensor, xc: torch.Tensor, recon: torch.Tensor, codes: SparseCodes,
              pre: torch.Tensor, dead_mask: torch.Tensor | None) -> SAEOutput:
    """FVU + AuxK: dead latents (top aux_k of them) reconstruct the residual, without b_dec."""
    var = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    loss_fvu = (recon - x).pow(2).sum() / var
    loss = loss_fvu
    aux = loss_fvu.new_zeros(())
    if dead_mask is not None and sae.training and sync_free(x):
        # no host sync (CUDA): AuxK always runs over the top min(aux_k, d_sae) masked latents and is
        # weighted min(n_dead/aux_k, 1), so 0 when none is dead; otherwise as below
        aux_k = sae.cfg.aux_k or sae.cfg.d_in // 2
        _, e_hat, _ = topk_autoencode(xc, sae.enc, sae.b_enc, sae.W_dec, min(aux_k, sae.cfg.d_sae), mask=dead_mask,
                                      pre=pre)
        aux = (dead_mask.sum() / aux_k).clamp(max=1.0) * (e_hat - (x - recon).detach()).pow(2).sum() / var
        loss = loss + sae.cfg.aux_coef * aux
    elif dead_mask is not None and sae.training:
        n_dead = int(dead_mask.sum())
        aux_k = sae.cfg.aux_k or sae.cfg.d_in // 2
        if n_dead > 0:
            k_aux = min(aux_k, n_dead)
            e_hat = _aux_decode(sae, xc, pre, dead_mask, k_aux)
            e = (x - recon).detach()
            aux = min(n_dead / aux_k, 1.0) * (e_hat - e).pow(2).sum() / var
            loss = loss + sae.cfg.aux_coef * aux
    return SAEOutput(recon, loss, {"fvu": loss_fvu.detach(), "aux": aux.detach()},
                     codes.l0().detach(), codes.fire_counts(), codes)


def _aux_decode(sae: SAE, xc: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Decoding (no b_dec) of each row's top k_aux dead latents.

    When most dead latents are picked in every row (k_aux close to the number dead), the codes are
    nearly dense over the dead columns, and plain matmuls on those columns beat sparse kernels;
    otherwise the sparse path is used.
    """
    dead_idx = dead_mask.nonzero().squeeze(1)
    if 4 * k_aux < len(dead_idx):
        _, e_hat, _ = topk_autoencode(xc, sae.enc, sae.b_enc, sae.W_dec, k_aux, mask=dead_mask, pre=pre)
        return e_hat
    with torch.no_grad():
        sub = pre.index_select(1, dead_idx)
        keep = torch.zeros_like(sub, dtype=torch.bool)
        if k_aux < len(dead_idx):
            keep.scatter_(1, sub.topk(k_aux, dim=1, sorted=False).indices, True)
        else:
            keep.fill_(True)
    acts = F.relu(F.linear(xc, sae.enc[dead_idx], sae.b_enc[dead_idx])) * keep
    return acts @ sae.W_dec[dead_idx]


class BatchTopKSAE(SAE):
    """BatchTopK: the top B·k activations of the whole batch; saves a threshold for inference."""

    name = "batchtopk"
    has_threshold = True
    saves_threshold = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf, lead = _flat(x)
        pre = F.relu(self.pre_acts(xf))
        return (pre * (pre > self.threshold)).reshape(*lead, -1)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        xc = x - self.b_dec
        b, n = x.shape[0], self.cfg.d_sae
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc.detach(), self.enc.detach().t())
            if self.training:
                flat = F.relu(pre).reshape(-1)
                _, fidx = flat.topk(min(b * self.cfg.k, flat.numel()), sorted=False)
                fidx = fidx.sort().values
                sel = flat[fidx] > 0
                fidx = fidx[sel]
            else:
                fidx = ((pre > self.threshold) & (pre > 0)).reshape(-1).nonzero().squeeze(1)
            rows, cols = fidx // n, fidx % n
            counts = torch.bincount(rows, minlength=b)
            offsets = torch.cumsum(counts, 0) - counts
            gathered = pre.reshape(-1)[fidx]
            if self.training and gathered.numel():
                m = self.cfg.threshold_momentum
                lo = gathered.min()
                cur = self.threshold[0]
                new = lo if float(cur) == 0.0 else m * cur + (1 - m) * lo
                self.threshold.fill_(float(new))
        codes, recon = sparse_autoencode(xc, self.enc, self.b_enc, self.W_dec, cols, offsets, gathered, b)
        return _with_aux(self, x, xc, recon + self.b_dec, codes, pre, dead_mask)


class ReLUSAE(SAE):
    """ReLU with an L1 penalty weighted by decoder row norms (decoder norms left free)."""

    name = "relu"
    unit_norm_decoder = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        f = F.relu(self.pre_acts(x))
        recon = f @ self.W_dec + self.b_dec
        loss_fvu = fvu(recon, x)
        l1 = (f * self.W_dec.norm(dim=1)).sum(1).mean()
        # λ is Anthropic's (inputs of norm √d, summed MSE); in our units (unit mean ‖x‖², FVU) it is λ/√d
        loss = loss_fvu + self.cfg.l1_coef / math.sqrt(self.cfg.d_in) * l1
        active = f.detach() > 0
        return SAEOutput(recon, loss, {"fvu": loss_fvu.detach(), "l1": l1.detach()},
                         active.sum(1).float().mean(), active.sum(0), f)


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z·H(z−θ); straight-through θ gradient −(θ/ε)·K((z−θ)/ε) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        gz = g * (z > theta)
        gt = (-(theta / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0)
        return gz, gt, None


class _Step(torch.autograd.Function):
    """H(z−θ) with straight-through θ gradient −(1/ε)·K((z−θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        gt = (-(1.0 / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0)
        return None, gt, None


class JumpReLUSAE(SAE):
    """JumpReLU with a learned per-latent threshold and an L0 penalty (straight-through)."""

    name = "jumprelu"
    saves_threshold = True

    def __init__(self, cfg: ArchConfig, **kw):
        super().__init__(cfg, **kw)
        dev = self.W_dec.device
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold), device=dev))

    @property
    def threshold(self) -> torch.Tensor:  # type: ignore[override]
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.pre_acts(x))
        return pre * (pre > self.threshold)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        pre = F.relu(self.pre_acts(x))
        theta = self.log_threshold.exp()
        f = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        recon = f @ self.W_dec + self.b_dec
        loss_fvu = fvu(recon, x)
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum(1).mean()
        loss = loss_fvu + self.cfg.l0_coef * l0
        active = f.detach() > 0
        return SAEOutput(recon, loss, {"fvu": loss_fvu.detach(), "l0_loss": l0.detach()},
                         active.sum(1).float().mean(), active.sum(0), f)

    def _fold_extra(self, scale: float) -> None:
        self.log_threshold -= math.log(scale)


ARCHITECTURES: dict[str, type[SAE]] = {c.name: c for c in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE)}


def build_sae(cfg: ArchConfig, **kw) -> SAE:
    """Instantiate the architecture named by cfg.arch."""
    try:
        cls = ARCHITECTURES[cfg.arch]
    except KeyError:
        from saeforge.errors import UserError
        raise UserError(f"unknown architecture {cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return cls(cfg, **kw)

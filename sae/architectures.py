"""SAE architectures behind one interface, looked up by name in `ARCHITECTURES`.

Every SAE has the same parameters (`enc` [d_sae, d_in] = W_encᵀ, `b_enc`, `W_dec` [d_sae, d_in],
`b_dec`, optional `threshold`), `encode(x) -> latents`, `decode(latents) -> x̂` and
`forward(x, dead_mask) -> SAEOutput` with the reconstruction, loss and its terms. The encoder is
stored latent-major so the sparse kernels can address one latent's row; `W_enc` gives the
[d_in, d_sae] view of the file format.

Loss is the fraction of variance unexplained (FVU): Σ‖x̂−x‖² / Σ‖x−mean(x)‖² over the batch.

The same classes make the other dictionary kinds (`ArchConfig` fields):
- transcoder (`transcoder=True`): reads one hook point and predicts another (y); loss = FVU of y. The
  input is centred by a fixed buffer `b_in` (the input's mean, or median with --init-b-dec; folded into b_enc at save), not by b_dec,
  which lives in the target's space. `skip=True` adds a learned linear term x·W_skipᵀ (Paulo et al. 2025).
- crosscoder (`n_layers=L > 1`, arch "crosscoder"): one TopK code read from and written to L hook points
  (acausal crosscoder, Lindsey et al. 2024): the input is the L activations side by side, [.., L·d_in];
  each decoder row spans all L layers (unit norm over them), so a TopK decode costs L decodes of width
  d_in; loss = mean over layers of each layer's FVU.
- Matryoshka BatchTopK (arch "matryoshka", `group_sizes`): BatchTopK whose nested prefixes of the
  dictionary (the first 1, 2, … groups) each reconstruct the input (Bussmann et al. 2025; Nabeshima
  2024); loss = mean over prefixes of the prefix's FVU (dictionary_learning's default weighting; the
  paper sums, which differs by the constant factor G). Inference is BatchTopK's (its saved threshold).
"""
from __future__ import annotations

import itertools
import math
import typing
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
    transcoder: bool = False  # predicts another hook point than it reads (no b_dec centring of the input)
    skip: bool = False  # transcoder: + x·W_skipᵀ, a learned linear skip term
    group_sizes: list[int] | None = None  # matryoshka: latents per nested group, in order (sum = d_sae)
    n_layers: int = 1  # crosscoder: hook points read and written together, d_in wide each

    @property
    def width(self) -> int:
        """Width of the input (and output) vector: d_in per layer, layers side by side."""
        return self.d_in * self.n_layers

    @property
    def kind(self) -> str:
        """sae, transcoder, skip_transcoder or crosscoder (cfg.json's `kind`)."""
        if self.n_layers > 1:
            return "crosscoder"
        if self.transcoder:
            return "skip_transcoder" if self.skip else "transcoder"
        return "sae"


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


def batch_var(y: torch.Tensor, n_layers: int = 1) -> torch.Tensor:
    """[n_layers] Σ‖y_l − mean(y_l)‖² over the batch: the FVU denominators (one per layer)."""
    dev = (y - y.mean(0, keepdim=True)).pow(2)
    if n_layers == 1:
        return dev.sum().clamp_min(1e-12).reshape(1)
    return dev.reshape(y.shape[0], n_layers, -1).sum((0, 2)).clamp_min(1e-12)


def layer_fvu(recon: torch.Tensor, y: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean over layers of Σ‖ŷ_l − y_l‖² / var_l (for one layer: the FVU)."""
    err = (recon - y).pow(2)
    if var.numel() == 1:
        return err.sum() / var[0]
    return (err.reshape(y.shape[0], var.numel(), -1).sum((0, 2)) / var).mean()


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
        d, n = cfg.width, cfg.d_sae
        w = torch.randn(n, d, generator=generator).to(device)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.enc = nn.Parameter(w.clone())  # W_enc = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device) if b_dec is None else b_dec.clone().float().to(device))
        if self.has_threshold:
            self.register_buffer("threshold", torch.zeros(n, device=device))
        if cfg.transcoder:  # input centre: fixed during training, folded into b_enc when saved
            self.register_buffer("b_in", torch.zeros(d, device=device))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device))  # [d_out, d_in]

    @property
    def _threshold(self) -> torch.Tensor:
        """The saved inference threshold buffer (JumpReLU/BatchTopK), typed."""
        return typing.cast(torch.Tensor, self.threshold)

    @property
    def W_enc(self) -> torch.Tensor:
        """[d_in, d_sae] view (the file format's layout)."""
        return self.enc.t()

    # ---- interface -------------------------------------------------------------------------
    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x − b_dec for an autoencoder, x − b_in for a transcoder."""
        return x - (typing.cast(torch.Tensor, self.b_in) if self.cfg.transcoder else self.b_dec)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.centre(x), self.enc, self.b_enc)

    def kernel_input(self, x: torch.Tensor, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(xc, centre) for the sparse kernels. An autoencoder on constant inputs passes xc detached and
        b_dec as the centre: the kernel then returns b_dec's gradient as one matrix-vector product rather
        than a per-row input gradient it would sum (sparse_ops.SparseAutoencode)."""
        if self.cfg.transcoder or x.requires_grad or not self.b_dec.requires_grad:
            return xc, None
        return xc.detach(), self.b_dec

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | None:
        """x·W_skipᵀ for a skip-transcoder (None otherwise)."""
        return F.linear(x, self.W_skip) if self.cfg.skip else None

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, output) under the inference rule; the output includes a skip-transcoder's skip term.

        What evaluation, splicing and steering use: decode(encode(x)) alone misses the skip term."""
        f = self.encode(x)
        out = self.decode(f)
        skip = self.skip_term(x)
        return f, out if skip is None else out + skip

    def layer_slice(self, layer: int) -> slice:
        """Columns of layer `layer` in the input/output vector (all of it for one layer)."""
        d = self.cfg.d_in
        return slice(layer * d, (layer + 1) * d)

    def decoder_rows(self, layer: int = -1) -> torch.Tensor:
        """[d_sae, d_in] decoder of one output layer (a crosscoder's last by default; an SAE's W_dec)."""
        return self.W_dec[:, self.layer_slice(layer % self.cfg.n_layers)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [..., d_sae] of raw inputs [..., d_in] (inference rule)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        """Training forward. target: what to reconstruct (a transcoder's y; default x). var: the FVU
        denominators per layer (default: this batch's; data-parallel training passes the global batch's / N)."""
        raise NotImplementedError

    @torch.no_grad()
    def centre_input(self, b_in: torch.Tensor) -> None:
        """Set a transcoder's fixed input centre (the input's mean or median, --init-b-dec)."""
        typing.cast(torch.Tensor, self.b_in).copy_(b_in)

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
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x·scale take raw x: latents and outputs become raw-unit.

        pre(x·s) = s·(x − b_dec/s)·W_enc + b_enc, so dividing b_enc, b_dec and the threshold by s
        gives latents f/s for raw x, and decoding them with the unchanged unit-norm W_dec plus b_dec/s
        yields x̂/s. Decoder rows keep their norm (and their interpretation).
        """
        self.fold_scales([scale], [scale])

    @torch.no_grad()
    def fold_scales(self, s_in: list[float], s_out: list[float]) -> None:
        """Make a dictionary trained on scaled inputs (s_in per input hook) and targets (s_out per output
        hook) take and give raw activations; afterwards b_in is 0 (folded into b_enc).

        autoencoder (s_in = s_out = [s]): b_enc, b_dec, threshold / s (latents in raw units, W_dec unit norm).
        transcoder (s_x → s_y): W_enc·s_x/s_y, (b_enc − b_in·W_enc)/s_y, b_dec/s_y, threshold/s_y,
            W_skip·s_x/s_y (latents in the target's raw units, W_dec unit norm).
        crosscoder (s_l per layer): layer l's encoder columns × s_l, its decoder columns and b_dec / s_l
            (latents stay in training units; each layer's decoder carries that layer's scale)."""
        cfg = self.cfg
        if cfg.n_layers > 1:
            col = torch.tensor(s_in, dtype=self.enc.dtype, device=self.enc.device).repeat_interleave(cfg.d_in)
            self.enc.mul_(col)
            self.W_dec.div_(col)
            self.b_dec.div_(col)
            return
        sx, sy = float(s_in[0]), float(s_out[0])
        if cfg.transcoder:
            b_in = typing.cast(torch.Tensor, self.b_in)
            self.b_enc.sub_(self.enc @ b_in)
            b_in.zero_()
            self.enc.mul_(sx / sy)
            if cfg.skip:
                self.W_skip.mul_(sx / sy)
        self.b_enc.div_(sy)
        self.b_dec.div_(sy)
        if self.has_threshold:
            self._threshold.div_(sy)
        self._fold_extra(sy)

    def _fold_extra(self, scale: float) -> None:
        pass


def _starts(sorted_keys: torch.Tensor, n: int) -> torch.Tensor:
    """Offset of the first entry of each key 0..n-1 in ascending keys (bincount + cumsum without the
    data-sized bincount, which synchronises a CUDA device)."""
    return torch.searchsorted(sorted_keys, torch.arange(n, device=sorted_keys.device, dtype=sorted_keys.dtype))


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

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        xc = self.centre(x)
        kx, centre = self.kernel_input(x, xc)
        codes, recon, pre = topk_autoencode(kx, self.enc, self.b_enc, self.W_dec, self.cfg.k, centre=centre)
        return _with_aux(self, x, xc, _output(self, recon, x), codes, pre, dead_mask, target, var)


def _output(sae: SAE, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dictionary part (no bias) → output: + b_dec, + a skip-transcoder's skip term."""
    skip = sae.skip_term(x)
    return recon + sae.b_dec if skip is None else recon + sae.b_dec + skip


def _aux_term(sae: SAE, x: torch.Tensor, xc: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor | None,
              residual: torch.Tensor, var: torch.Tensor) -> torch.Tensor | None:
    """AuxK: the top aux_k dead latents reconstruct the residual (no b_dec), as a fraction of var."""
    if dead_mask is None or not sae.training:
        return None
    aux_k = sae.cfg.aux_k or sae.cfg.d_in // 2
    if sync_free(xc):
        # no host sync (CUDA): AuxK always runs over the top min(aux_k, d_sae) masked latents and is
        # weighted min(n_dead/aux_k, 1), so 0 when none is dead; otherwise as below
        kx, centre = sae.kernel_input(x, xc)
        _, e_hat, _ = topk_autoencode(kx, sae.enc, sae.b_enc, sae.W_dec, min(aux_k, sae.cfg.d_sae), mask=dead_mask,
                                      pre=pre, centre=centre)
        return (dead_mask.sum() / aux_k).clamp(max=1.0) * layer_fvu(e_hat, residual.detach(), var)
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return None
    e_hat = _aux_decode(sae, x, xc, pre, dead_mask, min(aux_k, n_dead))
    return min(n_dead / aux_k, 1.0) * layer_fvu(e_hat, residual.detach(), var)


def _with_aux(sae: SAE, x: torch.Tensor, xc: torch.Tensor, recon: torch.Tensor, codes: SparseCodes,
              pre: torch.Tensor, dead_mask: torch.Tensor | None, target: torch.Tensor | None = None,
              var: torch.Tensor | None = None, loss_fvu: torch.Tensor | None = None,
              terms: dict[str, torch.Tensor] | None = None) -> SAEOutput:
    """FVU (of the target; mean over a crosscoder's layers) + AuxK on dead latents.

    `loss_fvu`, when given, replaces the FVU of `recon` (Matryoshka's mean over prefixes)."""
    y = x if target is None else target
    if var is None:
        var = batch_var(y, sae.cfg.n_layers)
    full = layer_fvu(recon, y, var)
    loss_fvu = full if loss_fvu is None else loss_fvu
    loss = loss_fvu
    aux = _aux_term(sae, x, xc, pre, dead_mask, y - recon, var)
    if aux is not None:
        loss = loss + sae.cfg.aux_coef * aux
    else:
        aux = loss_fvu.new_zeros(())
    out_terms = {"fvu": full.detach(), "aux": aux.detach(), **(terms or {})}
    return SAEOutput(recon, loss, out_terms, codes.l0().detach(), codes.fire_counts(), codes)


def _aux_decode(sae: SAE, x: torch.Tensor, xc: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor,
                k_aux: int) -> torch.Tensor:
    """Decoding (no b_dec) of each row's top k_aux dead latents.

    When most dead latents are picked in every row (k_aux close to the number dead), the codes are
    nearly dense over the dead columns, and plain matmuls on those columns beat sparse kernels;
    otherwise the sparse path is used.
    """
    dead_idx = dead_mask.nonzero().squeeze(1)
    if 4 * k_aux < len(dead_idx):
        kx, centre = sae.kernel_input(x, xc)
        _, e_hat, _ = topk_autoencode(kx, sae.enc, sae.b_enc, sae.W_dec, k_aux, mask=dead_mask, pre=pre, centre=centre)
        return e_hat
    with torch.no_grad():
        sub = pre.index_select(1, dead_idx)
        keep = torch.zeros_like(sub, dtype=torch.bool)
        if k_aux < len(dead_idx):
            keep.scatter_(1, sub.topk(k_aux, dim=1, sorted=False).indices, True)
        else:
            keep.fill_(True)
    # sparse row gradients: a full-size zero gradient per parameter would cost more than these matmuls
    acts = F.relu(F.linear(xc, F.embedding(dead_idx, sae.enc, sparse=True), sae.b_enc[dead_idx])) * keep
    return acts @ F.embedding(dead_idx, sae.W_dec, sparse=True)


class BatchTopKSAE(SAE):
    """BatchTopK: the top B·k activations of the whole batch; saves a threshold for inference."""

    name = "batchtopk"
    has_threshold = True
    saves_threshold = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf, lead = _flat(x)
        pre = F.relu(self.pre_acts(xf))
        return (pre * (pre > self._threshold)).reshape(*lead, -1)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        xc = self.centre(x)
        b = x.shape[0]
        rows, cols, gathered, pre = self._select(xc)
        offsets = _starts(rows, b)
        kx, centre = self.kernel_input(x, xc)
        codes, recon = sparse_autoencode(kx, self.enc, self.b_enc, self.W_dec, cols, offsets, gathered, b, centre)
        return _with_aux(self, x, xc, _output(self, recon, x), codes, pre, dead_mask, target, var)

    @torch.no_grad()
    def _select(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, pre-activations) of the chosen entries, row-major with ascending latents, and the
        dense pre-activations: the batch's top B·k in training (updating the threshold EMA), the saved
        threshold in eval mode."""
        b, n = xc.shape[0], self.cfg.d_sae
        pre = torch.addmm(self.b_enc.detach(), xc.detach(), self.enc.detach().t())
        if self.training:
            flat = F.relu(pre).reshape(-1)
            _, fidx = flat.topk(min(b * self.cfg.k, flat.numel()), sorted=False)
            fidx = fidx.sort().values
            if not sync_free(xc):  # drop the zeros (a data-sized boolean index: a host sync on CUDA, where
                fidx = fidx[flat[fidx] > 0]  # they stay in as value-0 entries, which add nothing)
        else:
            fidx = ((pre > self._threshold) & (pre > 0)).reshape(-1).nonzero().squeeze(1)
        rows, cols = fidx // n, fidx % n
        gathered = pre.reshape(-1)[fidx]
        if self.training and gathered.numel():
            self._update_threshold(gathered)
        return rows, cols, gathered, pre

    @torch.no_grad()
    def _update_threshold(self, gathered: torch.Tensor) -> None:
        """EMA of the smallest positive selected pre-activation (its first value: that minimum), on the device."""
        m = self.cfg.threshold_momentum
        lo = gathered.masked_fill(gathered <= 0, float("inf")).min()
        cur = self._threshold[0]
        new = torch.where(cur == 0, lo, m * cur + (1 - m) * lo)
        self._threshold.fill_(torch.where(torch.isfinite(lo), new, cur))


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: every nested prefix of the dictionary (groups 1..g) reconstructs the target.

    One sparse decode serves all prefixes: the batch's entries are bagged by (row, group) — entries are
    row-major with ascending latents, and groups are contiguous latent ranges, so the bags are contiguous
    — giving each group's partial decode [B, G, d]; a cumulative sum over groups gives every prefix."""

    name = "matryoshka"

    def prefix_ends(self) -> list[int]:
        """Latent count of each nested prefix (the last is d_sae)."""
        sizes = self.cfg.group_sizes or [self.cfg.d_sae]
        return [int(v) for v in itertools.accumulate(sizes)]

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        xc = self.centre(x)
        b, n = x.shape[0], self.cfg.d_sae
        ends = self.prefix_ends()
        G = len(ends)
        rows, cols, gathered, pre = self._select(xc)
        group = torch.bucketize(cols, torch.tensor(ends, device=cols.device), right=True)
        offsets = _starts(rows * G + group, b * G)  # entries are row-major, latents ascending: bags sorted
        xc_bags = xc.repeat_interleave(G, dim=0) if G > 1 else xc
        bag_codes, parts = sparse_autoencode(xc_bags, self.enc, self.b_enc, self.W_dec, cols, offsets, gathered, b * G)
        prefixes = parts.reshape(b, G, -1).cumsum(1)
        y = x if target is None else target
        if var is None:
            var = batch_var(y, self.cfg.n_layers)
        skip = self.skip_term(x)
        prefix_out = prefixes + (self.b_dec if skip is None else self.b_dec + skip.unsqueeze(1))
        prefix_fvu = torch.stack([layer_fvu(prefix_out[:, g], y, var) for g in range(G)])
        codes = SparseCodes(cols, _starts(rows, b), bag_codes.vals, b, n)
        terms = {f"prefix_fvu_{e}": v.detach() for e, v in zip(ends[:-1], prefix_fvu[:-1])}
        return _with_aux(self, x, xc, prefix_out[:, -1], codes, pre, dead_mask, target, var,
                         loss_fvu=prefix_fvu.mean(), terms=terms)

    @torch.no_grad()
    def prefix_decodes(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """decode() of the latents with only prefix 1, 2, … of the dictionary (for evaluation)."""
        out, start, acc = [], 0, self.b_dec.expand(*latents.shape[:-1], -1)
        for end in self.prefix_ends():
            acc = acc + latents[..., start:end] @ self.W_dec[start:end]
            out.append(acc)
            start = end
        return out


class CrosscoderSAE(TopKSAE):
    """Acausal crosscoder: one TopK code of L hook points side by side, decoded into all of them."""

    name = "crosscoder"


class ReLUSAE(SAE):
    """ReLU with an L1 penalty weighted by decoder row norms (decoder norms left free)."""

    name = "relu"
    unit_norm_decoder = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        f = F.relu(self.pre_acts(x))
        recon = f @ self.W_dec + self.b_dec
        loss_fvu = layer_fvu(recon, x, batch_var(x) if var is None else var)
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

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        pre = F.relu(self.pre_acts(x))
        theta = self.log_threshold.exp()
        f = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        recon = f @ self.W_dec + self.b_dec
        loss_fvu = layer_fvu(recon, x, batch_var(x) if var is None else var)
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum(1).mean()
        loss = loss_fvu + self.cfg.l0_coef * l0
        active = f.detach() > 0
        return SAEOutput(recon, loss, {"fvu": loss_fvu.detach(), "l0_loss": l0.detach()},
                         active.sum(1).float().mean(), active.sum(0), f)

    def _fold_extra(self, scale: float) -> None:
        self.log_threshold.sub_(math.log(scale))


ARCHITECTURES: dict[str, type[SAE]] = {c.name: c for c in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE, MatryoshkaSAE,
                                                             CrosscoderSAE)}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka", "crosscoder")  # archs with k (and AuxK; transcoders allowed)
TRANSCODER_ARCHS = ("topk", "batchtopk", "matryoshka")


def build_sae(cfg: ArchConfig, **kw) -> SAE:
    """Instantiate the architecture named by cfg.arch."""
    try:
        cls = ARCHITECTURES[cfg.arch]
    except KeyError:
        from saeforge.errors import UserError
        raise UserError(f"unknown architecture {cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return cls(cfg, **kw)

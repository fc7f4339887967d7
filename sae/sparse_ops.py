"""Sparse kernels for k-sparse codes on CPU (and any device).

A dense TopK step costs ~12·d·n FLOP/token; only the encoder's forward matmul really needs the
whole dictionary. Codes are kept as a flat CSR-like triple (cols, offsets, vals) so TopK (fixed k
per row) and BatchTopK (variable count per row) share one path:

- decode: `F.embedding_bag(mode="sum", per_sample_weights=vals)`; its native backward gives the
  W_dec gradient (a scatter-add of vals-weighted output gradients) and the vals gradient (row
  dot products) without materialising [B, k, d].
- encode backward (`SparseEncode`): the encoder gradient is Sᵀ·x, where S holds the k gradient
  values per row — exactly the weight gradient of an embedding_bag whose output gradient is x,
  so we reuse that native kernel; the input gradient (needed for b_dec) is embedding_bag(enc, g).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseCodes:
    """Row-compressed sparse latents: row r owns cols/vals[offsets[r]:offsets[r+1]]."""

    cols: torch.Tensor  # [nnz] int64 latent indices
    offsets: torch.Tensor  # [B] int64 start of each row (embedding_bag convention)
    vals: torch.Tensor  # [nnz] float activations (may carry autograd)
    n_rows: int
    d_sae: int

    @staticmethod
    def from_topk(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> "SparseCodes":
        b, k = idx.shape
        offsets = torch.arange(0, b * k, k, device=idx.device, dtype=torch.int64)
        return SparseCodes(idx.reshape(-1), offsets, vals.reshape(-1), b, d_sae)

    def row_ids(self) -> torch.Tensor:
        """Row index of every stored entry."""
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.cols.numel()]))
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.cols.device), counts)

    def dense(self) -> torch.Tensor:
        """Materialise as [B, d_sae] (for inference and tests, not the training hot path)."""
        out = self.vals.new_zeros(self.n_rows, self.d_sae)
        out.index_put_((self.row_ids(), self.cols), self.vals, accumulate=True)
        return out

    def l0(self) -> torch.Tensor:
        """Mean number of non-zero latents per row."""
        return (self.vals != 0).sum().float() / max(self.n_rows, 1)

    def fire_counts(self) -> torch.Tensor:
        """Int [d_sae]: in how many rows each latent is non-zero."""
        return torch.bincount(self.cols[self.vals.detach() != 0], minlength=self.d_sae)


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j vals_j · W_dec[cols_j] per row, [B, d]; gradients flow to vals and W_dec."""
    return F.embedding_bag(codes.cols, W_dec, codes.offsets, mode="sum", per_sample_weights=codes.vals)


class SparseEncode(torch.autograd.Function):
    """Pre-activations at chosen (row, latent) positions, with an O(nnz·d) backward.

    The forward receives the values already gathered from the dense pre-activation matrix
    (computed without autograd); only the backward is special.
    """

    @staticmethod
    def forward(ctx, x, enc, b_enc, cols, offsets, gathered):  # type: ignore[override]
        ctx.save_for_backward(x, enc, cols, offsets)
        return gathered.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, enc, cols, offsets = ctx.saved_tensors
        g = g.contiguous()
        grad_x = grad_enc = grad_b = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                w = enc.detach().requires_grad_(True)
                out = F.embedding_bag(cols, w, offsets, mode="sum", per_sample_weights=g)
                (grad_enc,) = torch.autograd.grad(out, w, x)
            if ctx.needs_input_grad[0]:
                grad_x = out.detach()
        elif ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, enc, offsets, mode="sum", per_sample_weights=g)
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(enc.shape[0]).index_add_(0, cols, g)
        return grad_x, grad_enc, grad_b, None, None, None


def sparse_encode(x: torch.Tensor, enc: torch.Tensor, b_enc: torch.Tensor, cols: torch.Tensor,
                  offsets: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """Differentiable pre-activations (x·encᵀ + b_enc) at the given sparse positions."""
    return SparseEncode.apply(x, enc, b_enc, cols, offsets, gathered)


def topk_codes(x: torch.Tensor, enc: torch.Tensor, b_enc: torch.Tensor, k: int,
               mask: torch.Tensor | None = None, pre: torch.Tensor | None = None
               ) -> tuple[SparseCodes, torch.Tensor]:
    """TopK(ReLU) codes of x with a sparse backward; returns (codes, dense pre-activations).

    `mask` (bool [d_sae]) restricts the choice to some latents (AuxK on dead latents);
    `pre` reuses pre-activations already computed for this batch.
    """
    if pre is None:
        with torch.no_grad():
            pre = torch.addmm(b_enc, x.detach(), enc.detach().t())
    src = pre if mask is None else pre.masked_fill(~mask, float("-inf"))
    gathered, idx = src.topk(k, dim=1, sorted=False)
    gathered = gathered.masked_fill(torch.isinf(gathered), 0.0)
    codes = SparseCodes.from_topk(idx, gathered, enc.shape[0])
    vals = sparse_encode(x, enc, b_enc, codes.cols, codes.offsets, codes.vals)
    codes.vals = F.relu(vals)
    return codes, pre

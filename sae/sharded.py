"""Latent-sharded TopK SAE on torch.distributed: one SAE's latents split across the ranks of a group.

Rank r of N holds latents [r·n/N, (r+1)·n/N): its columns of W_enc (rows of `enc`), of b_enc and
its rows of W_dec; b_dec is replicated. Every rank sees the same batch. Per step:

- local pre-activations and local top-k candidates; one all_gather of the N·k candidates per row
  and a top-k over them choose exactly the latents a single process would (the global top k are
  among the union of the local top k);
- each rank decodes its own chosen latents (the others enter its embedding_bag with value 0) and one
  all_reduce sums the partial reconstructions; its backward is the identity, since every rank
  computes the same loss of the same sum;
- backward stays local except b_dec, whose encoder-side gradient (through x − b_dec) is summed;
- decoder-gradient projection, decoder renormalisation and the optimizer are per row / element,
  so local; gradient clipping uses the global norm (one scalar all_reduce).

AuxK (dead latents reconstructing the residual) uses the same global choice over the dead-masked
pre-activations. Parameter and optimizer memory per rank are ~1/N of the whole SAE's.
`saeforge train --shard-latents N` (sae/trainer.py) trains through this module; with more ranks than
N the ranks form a 2-D mesh (data × shard, sae/distributed.py) and the gradients of each shard are
also averaged over the data ranks that hold it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sae.architectures import SAE, ArchConfig, SAEOutput, build_sae
from sae.sparse_ops import sparse_autoencode
from saeforge.errors import UserError


class _SumPartials(torch.autograd.Function):
    """all_reduce(SUM) forward; identity backward (the loss of the sum is the same on every rank)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class _SumGrad(torch.autograd.Function):
    """Identity forward; all_reduce(SUM) of the gradient (a replicated input to sharded work)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def global_topk(pre: torch.Tensor, k: int, offset: int, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, global latent indices) [B, k] of the top k over all ranks' latents, from this rank's
    pre-activations [B, n_local] whose first latent is `offset`."""
    world = dist.get_world_size(group)
    v, i = pre.topk(min(k, pre.shape[1]), dim=1, sorted=False)
    i = i + offset
    vs, is_ = [torch.empty_like(v) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(vs, v.contiguous(), group=group)
    dist.all_gather(is_, i.contiguous(), group=group)
    top, pos = torch.cat(vs, 1).topk(k, dim=1, sorted=False)
    return top, torch.cat(is_, 1).gather(1, pos)


class ShardedTopK(nn.Module):
    """This rank's shard of a TopK SAE (same parameter names as sae.architectures.TopKSAE)."""

    has_threshold = False  # the trainer's interface of an SAE (sae.architectures.SAE)

    def __init__(self, cfg: ArchConfig, rank: int, world: int, group: Any = None):
        super().__init__()
        if cfg.arch != "topk":
            raise UserError(f"--shard-latents supports --arch topk, not {cfg.arch!r}")
        if cfg.d_sae % world:
            raise UserError(f"--shard-latents {world} does not divide the dictionary ({cfg.d_sae} latents); "
                            f"use a rank count that divides d_sae")
        self.cfg, self.rank, self.world, self.group = cfg, rank, world, group
        self.n_local = cfg.d_sae // world
        self.offset = rank * self.n_local
        d = cfg.d_in
        self.enc = nn.Parameter(torch.zeros(self.n_local, d))
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.W_dec = nn.Parameter(torch.zeros(self.n_local, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    @classmethod
    def from_full(cls, sae: SAE, rank: int, world: int, group: Any = None) -> "ShardedTopK":
        """This rank's slice of a whole SAE (every rank builds the same one from the same seed)."""
        m = cls(sae.cfg, rank, world, group).to(sae.W_dec.device)
        sl = slice(m.offset, m.offset + m.n_local)
        with torch.no_grad():
            m.enc.copy_(sae.enc[sl])
            m.b_enc.copy_(sae.b_enc[sl])
            m.W_dec.copy_(sae.W_dec[sl])
            m.b_dec.copy_(sae.b_dec)
        return m

    def _decode_choice(self, xc: torch.Tensor, pre: torch.Tensor, k: int) -> torch.Tensor:
        """Whole-SAE decoding (no b_dec) of each row's global top k of `pre` (local [B, n_local])."""
        b = xc.shape[0]
        with torch.no_grad():
            top, gidx = global_topk(pre, k, self.offset, self.group)
            mine = (gidx >= self.offset) & (gidx < self.offset + self.n_local)
            cols = torch.where(mine, gidx - self.offset, torch.zeros_like(gidx))
            gathered = torch.where(mine, top, torch.full_like(top, float("-inf")))  # value 0, no gradient
        offsets = torch.arange(0, b * k, k, device=xc.device, dtype=torch.int64)
        codes, recon_local = sparse_autoencode(xc, self.enc, self.b_enc, self.W_dec, cols.reshape(-1), offsets,
                                               gathered.reshape(-1), b)
        self._codes, self._fired = codes, codes.fire_counts()
        self._l0 = (top > 0).sum(1).float().mean()  # the whole SAE's (the same on every rank)
        return _SumPartials.apply(recon_local, self.group)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                var: torch.Tensor | None = None) -> SAEOutput:
        """The whole SAE's training forward on x, as TopKSAE.forward computes it (SAEOutput).

        Loss = FVU + aux_coef·AuxK; `dead_mask` [n_local] marks this rank's dead latents (AuxK: the
        global top aux_k dead latents reconstruct the residual, weighted min(n_dead/aux_k, 1) with
        n_dead summed over the ranks); `var` [1]: the FVU denominator (default: this batch's; data
        parallelism passes the global batch's / data ranks). `fire_counts` and `latents` (sparse codes)
        are this rank's: its [n_local] latents."""
        if target is not None:
            raise UserError("--shard-latents trains autoencoders only (no --target)")
        xc = x - _SumGrad.apply(self.b_dec, self.group)  # the encoder side of b_dec's gradient, summed
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.enc.t())
        recon = self._decode_choice(xc, pre, self.cfg.k) + self.b_dec
        codes, fired, l0 = self._codes, self._fired, self._l0  # of the main choice (AuxK's decoding below resets them)
        v = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12) if var is None else var.reshape(())
        fvu = (recon - x).pow(2).sum() / v
        loss, aux = fvu, fvu.new_zeros(())
        if dead_mask is not None:
            aux_k = self.cfg.aux_k or self.cfg.d_in // 2
            n_dead = dead_mask.sum().to(torch.float32)
            dist.all_reduce(n_dead, group=self.group)
            e_hat = self._decode_choice(xc, pre.masked_fill(~dead_mask, float("-inf")), min(aux_k, self.cfg.d_sae))
            aux = (n_dead / aux_k).clamp(max=1.0) * (e_hat - (x - recon).detach()).pow(2).sum() / v
            loss = loss + self.cfg.aux_coef * aux
        return SAEOutput(recon, loss, {"fvu": fvu.detach(), "aux": aux.detach()}, l0, fired, codes)

    # ---- the rest of a training step -----------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole SAE: sharded squares summed, b_dec once."""
        sharded = [p.grad for p in (self.enc, self.b_enc, self.W_dec) if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in sharded]).sum()
        dist.all_reduce(sq, group=self.group)
        if self.b_dec.grad is not None:
            sq = sq + self.b_dec.grad.float().pow(2).sum()
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    @torch.no_grad()
    def gather_latents(self, t: torch.Tensor) -> torch.Tensor:
        """A per-latent tensor [n_local] of every rank, in latent order [d_sae] (on every rank)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, 0)

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole SAE's state dict (gathered on every rank), for one ordinary SAE directory."""
        out = {"b_dec": self.b_dec.detach().clone()}
        for name in ("enc", "b_enc", "W_dec"):
            out[name] = self.gather_latents(getattr(self, name).detach())
        return out

    def to_sae(self) -> SAE:
        """An ordinary (unsharded) TopKSAE holding the gathered weights."""
        sae = build_sae(self.cfg, device=self.W_dec.device)
        sae.load_state_dict(self.full_state())
        return sae

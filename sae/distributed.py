"""Data-parallel SAE training under torchrun (`torchrun --nproc-per-node N -m sae train …`).

Each rank reads the same seeded row stream and keeps its slice [r·B/N, (r+1)·B/N) of every global
batch of B rows, so the global batch equals the single-process one. Per step and SAE, one
all_reduce carries the gradients (averaged), the latents' fire counts (summed: dead-latent
counters stay identical on every rank) and the logged metrics (averaged); every rank then runs the
same decoder projection, clip and Adam step on the same numbers, so the weights stay identical
without a broadcast. Only rank 0 logs, checkpoints and saves.

FVU loss: its denominator is the variance of the *global* batch. Every rank computes Σ‖x − x̄‖²
of the global batch (one small all_reduce of per-rank means and sums, merged in float64) and the
variance-normalised part of its loss (FVU, AuxK) is rescaled by N·var_local/var_global, so the
averaged gradient is that of the single-process loss up to float rounding. Mean-over-rows terms
(ReLU L1, JumpReLU L0) average exactly as they are. BatchTopK selects the top (B/N)·k activations
of each rank's slice rather than of the global batch (its threshold EMA is kept identical by a MIN
all_reduce), so it is the only architecture whose DDP run is not the single-process run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saeforge.dist import rank_env
from saeforge.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (single process when absent)."""
    env = rank_env()
    return DistInfo(env.rank, env.world_size, env.local_rank)


def setup(device: str) -> tuple[DistInfo, str]:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); returns the rank info
    and the device this rank trains on (cuda → cuda:LOCAL_RANK)."""
    info = env_info()
    if not info.enabled:
        return info, device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{info.local_rank}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() != info.world or dist.get_rank() != info.rank:
        raise UserError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                        f"RANK={info.rank} WORLD_SIZE={info.world}")
    return info, device


def global_sq_dev(x: torch.Tensor, world: int) -> torch.Tensor:
    """Σ‖x − x̄‖² over the global batch (x̄ its mean) from each rank's equal-sized slice x (float64)."""
    n, d = x.shape
    xd = x.detach().double()
    mean = xd.mean(0)
    buf = torch.zeros(world, d + 1, dtype=torch.float64, device=x.device)
    buf[dist.get_rank(), :d] = mean
    buf[dist.get_rank(), d] = (xd - mean).pow(2).sum()
    dist.all_reduce(buf)
    means, m2 = buf[:, :d], buf[:, d]
    gmean = means.mean(0)  # equal slice sizes
    return m2.sum() + n * (means - gmean).pow(2).sum()


def reduce_step(params: list[torch.nn.Parameter], fire_counts: torch.Tensor, metrics: torch.Tensor,
                world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One all_reduce: grads averaged in place; returns (summed fire counts, averaged metrics)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [fire_counts.float(), metrics.float()])
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        k = g.numel()
        avg = (flat[at:at + k] / world).view_as(p)
        if p.grad is None:
            p.grad = avg.to(p.dtype)
        else:
            p.grad.copy_(avg)
        at += k
    counts = flat[at:at + fire_counts.numel()].round().to(fire_counts.dtype)
    at += fire_counts.numel()
    return counts, flat[at:] / world


def all_min_(t: torch.Tensor) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.MIN)


def any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_module(m: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (initialisation is seeded anyway; this makes sure)."""
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

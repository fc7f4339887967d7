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

Latent sharding (`--shard-latents N`, sae/sharded.py): the W ranks form a 2-D device mesh of
W/N data ranks × N shard ranks (rank r: data index r // N, shard index r % N). The N ranks of a
shard group hold one SAE's latents between them and see the same rows; the W/N ranks of a data
group hold the same shard and read different slices of the global batch, and everything above
(variance, gradient average, fire counts) runs over the data group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

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
    global _FLAGS
    _FLAGS = dist.new_group(backend="gloo") if cuda else None  # host flags agreed without the device
    if dist.get_world_size() != info.world or dist.get_rank() != info.rank:
        raise UserError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                        f"RANK={info.rank} WORLD_SIZE={info.world}")
    return info, device


@dataclass(frozen=True)
class LatentMesh:
    """This rank's place in the data × shard mesh of a latent-sharded run (groups of torch.distributed)."""
    data_index: int
    data_world: int
    shard_index: int
    shards: int
    data_group: Any  # ranks holding the same shard (gradients averaged here)
    shard_group: Any  # ranks holding one SAE between them (the same rows)


def latent_mesh(info: DistInfo, shards: int, device: str) -> LatentMesh:
    """The 2-D device mesh (torch.distributed.device_mesh) of `shards` shard ranks per data rank."""
    from torch.distributed.device_mesh import init_device_mesh
    if shards < 2:
        return LatentMesh(info.rank, info.world, 0, 1, None, None)
    if not info.enabled or info.world % shards:
        raise UserError(f"--shard-latents {shards} needs a multiple of {shards} ranks under torchrun (this run has "
                        f"{info.world}); start it with torchrun --nproc-per-node {shards} (or a multiple)")
    mesh = init_device_mesh(torch.device(device).type, (info.world // shards, shards),
                            mesh_dim_names=("data", "shard"))
    return LatentMesh(info.rank // shards, info.world // shards, info.rank % shards, shards,
                      mesh.get_group("data"), mesh.get_group("shard"))


def global_sq_dev(x: torch.Tensor, world: int, group: Any = None) -> torch.Tensor:
    """Σ‖x − x̄‖² over the global batch (x̄ its mean) from each rank's equal-sized slice x (float64);
    `world` ranks in `group` (default: all)."""
    n, d = x.shape
    xd = x.detach().double()
    mean = xd.mean(0)
    me = dist.get_rank(group)
    buf = torch.zeros(world, d + 1, dtype=torch.float64, device=x.device)
    buf[me, :d] = mean
    buf[me, d] = (xd - mean).pow(2).sum()
    dist.all_reduce(buf, group=group)
    means, m2 = buf[:, :d], buf[:, d]
    gmean = means.mean(0)  # equal slice sizes
    return m2.sum() + n * (means - gmean).pow(2).sum()


def reduce_step(params: list[torch.nn.Parameter], fire_counts: torch.Tensor, metrics: torch.Tensor,
                world: int, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One all_reduce over the `world` ranks of `group` (default: all): grads averaged in place;
    returns (summed fire counts, averaged metrics)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [fire_counts.float(), metrics.float()])
    dist.all_reduce(flat, group=group)
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


_FLAGS: Any = None  # a gloo group over the ranks of a CUDA run (None: the default group is gloo already)


def any_rank(flag: bool) -> bool:
    """Whether any rank's flag is set (the per-step stop check): a host tensor all_reduced over gloo, so
    it never waits for the GPU's queued work (a CUDA tensor's .item() would, every step)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_FLAGS)
    return bool(t.item())


def broadcast_module(m: torch.nn.Module, group: Any = None) -> None:
    """The parameters and buffers of the first rank of `group` (default: all) on every rank of it
    (initialisation is seeded anyway; this makes sure)."""
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, group=group, group_src=0)


def barrier(group: Any = None) -> None:
    """All ranks of `group` (default: all) wait here; nothing without a process group."""
    if dist.is_initialized():
        dist.barrier(group=group)

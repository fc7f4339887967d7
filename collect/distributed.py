"""torch.distributed for collection: which rank this process is, and the few collectives it needs.

`torchrun --nproc-per-node N -m collect collect …` sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; a process group is initialised only when WORLD_SIZE > 1 (gloo on CPU, nccl on
CUDA). Without torchrun everything here is a no-op for rank 0 of 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from collect.corpus import TokenShare
from saeforge.dist import RankEnv, rank_device, rank_env
from saeforge.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in the run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank (picklable objects)."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str, local_rank: int, world_size: int) -> str:
    """`cuda` means this rank's GPU (cuda:LOCAL_RANK) under torchrun; explicit `cuda:i` is kept."""
    return rank_device(device, RankEnv(local_rank=local_rank, world_size=world_size))


def init_from_env(device: str = "cpu") -> DistContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK; init the process group when WORLD_SIZE > 1 (or reuse one)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        env = rank_env()
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank,
                           local_world_size=env.local_world_size, backend=dist.get_backend())
    env = rank_env()
    world, rank, local_rank = env.world_size, env.rank, env.local_rank
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=env.local_world_size)
    if world == 1:
        return ctx
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"--device {device!r} requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(torch.device(resolve_device(device, local_rank, world)))
    ctx.backend = "nccl" if cuda else "gloo"
    dist.init_process_group(ctx.backend, rank=rank, world_size=world)
    ctx.owns_group = True
    log.info("rank %d of %d (local rank %d, backend %s)", rank, world, local_rank, ctx.backend)
    return ctx


def rank_share(n_items: int, rank: int, world_size: int) -> int:
    """How many of items 0..n_items-1 have index % world_size == rank (pack_sequences' slicing)."""
    return len(range(rank, n_items, world_size))


def token_share(ctx: DistContext) -> TokenShare | None:
    """Split tokenisation across the ranks of `ctx` (None for a single process): each rank tokenises
    one document batch per round and an all_gather_object hands every rank all of them."""
    if not ctx.active:
        return None
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(out, obj)
        return out

    return TokenShare(ctx.rank, ctx.world_size, gather)

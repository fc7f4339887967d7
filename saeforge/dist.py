"""The one reader of torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE).

`torchrun --nproc-per-node N …` sets these; without torchrun this process is rank 0 of 1.
Collection (`collect.distributed`) and training (`sae.distributed`) build their process groups on
top of what this module reads, so a bad value is reported the same way everywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from saeforge.errors import UserError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; unset it or launch with "
                        f"torchrun") from None


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun launch."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def rank_env() -> RankEnv:
    """What torchrun set, validated; rank 0 of 1 when it set nothing."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1 if world == 1 else world)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world} is invalid; launch with torchrun --nproc-per-node N")
    return RankEnv(rank, world, local_rank, local_world)


def rank_device(device: str, env: RankEnv) -> str:
    """`cuda` means this rank's GPU (cuda:LOCAL_RANK) under torchrun; an explicit `cuda:i` is kept."""
    if device == "cuda" and env.active:
        return f"cuda:{env.local_rank}"
    return device

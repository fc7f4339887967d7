"""Trainer checkpoints: everything needed to continue bit-exactly (written atomically)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from collect.errors import UserError

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """torch.save to a temporary file then rename, so a crash mid-write keeps the previous one."""
    p = checkpoint_path(out_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)
    return p


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    p = checkpoint_path(out_dir)
    if not p.is_file():
        raise UserError(f"--resume: no checkpoint in {str(out_dir)!r}; drop --resume to start a new run there")
    return torch.load(p, map_location="cpu", weights_only=False)


def config_changes(old: dict[str, Any], new: dict[str, Any], allowed: frozenset[str]) -> list[str]:
    """Names of config fields that differ, apart from those allowed to change on resume."""
    return sorted(k for k in set(old) | set(new) if k not in allowed and old.get(k) != new.get(k))

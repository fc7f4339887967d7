"""Trainer checkpoints: everything needed to continue bit-exactly (written atomically).

`out_dir` may be a local path or an fsspec URL (`memory://`, `s3://`, …); remote checkpoints are
written with one `pipe_file` (object stores replace whole objects, so a reader never sees half)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import UserError
from saeforge.urls import join, resolve

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(out_dir: str | os.PathLike) -> Path | str:
    return join(out_dir, CHECKPOINT)


def checkpoint_exists(out_dir: str | os.PathLike) -> bool:
    fs, root = resolve(out_dir)
    return Path(root, CHECKPOINT).is_file() if fs is None else fs.isfile(f"{root}/{CHECKPOINT}")


def remove_checkpoint(out_dir: str | os.PathLike) -> None:
    fs, root = resolve(out_dir)
    if fs is None:
        Path(root, CHECKPOINT).unlink(missing_ok=True)
    elif fs.isfile(f"{root}/{CHECKPOINT}"):
        fs.rm_file(f"{root}/{CHECKPOINT}")


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path | str:
    """torch.save to a temporary file then rename, so a crash mid-write keeps the previous one."""
    fs, root = resolve(out_dir)
    if fs is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{CHECKPOINT}", buf.getvalue())
        return checkpoint_path(out_dir)
    p = Path(root) / CHECKPOINT
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)
    return p


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    if not checkpoint_exists(out_dir):
        raise UserError(f"--resume: no checkpoint in {str(out_dir)!r}; drop --resume to start a new run there")
    fs, root = resolve(out_dir)
    if fs is None:
        return torch.load(Path(root) / CHECKPOINT, map_location="cpu", weights_only=False)
    return torch.load(io.BytesIO(fs.cat_file(f"{root}/{CHECKPOINT}")), map_location="cpu", weights_only=False)


def config_changes(old: dict[str, Any], new: dict[str, Any], allowed: frozenset[str]) -> list[str]:
    """Names of config fields that differ, apart from those allowed to change on resume."""
    return sorted(k for k in set(old) | set(new) if k not in allowed and old.get(k) != new.get(k))

"""Trainer checkpoints: everything needed to continue bit-exactly (written atomically).

The state is plain data (tensors, numbers, strings, lists, dicts) and is read back with
`torch.load(weights_only=True)`, so a crafted checkpoint.pt cannot run code on `--resume`: its
pickle is refused with one line naming the file.

`out_dir` may be a local path or an fsspec URL (`memory://`, `s3://`, …); remote checkpoints are
written with one `pipe_file` (object stores replace whole objects, so a reader never sees half)."""
from __future__ import annotations

import io
import os
import pickle
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
    src: Any = Path(root) / CHECKPOINT if fs is None else io.BytesIO(fs.cat_file(f"{root}/{CHECKPOINT}"))
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--resume: {str(checkpoint_path(out_dir))!r} is not a saeforge checkpoint that loads as "
                        f"plain data ({first[:200]}); remove it or start the run in another --out") from None
    if not isinstance(state, dict) or "members" not in state:
        raise UserError(f"--resume: {str(checkpoint_path(out_dir))!r} is not a saeforge trainer checkpoint; remove "
                        f"it or start the run in another --out")
    return state


def config_changes(old: dict[str, Any], new: dict[str, Any], allowed: frozenset[str]) -> list[str]:
    """Names of config fields that differ, apart from those allowed to change on resume."""
    return sorted(k for k in set(old) | set(new) if k not in allowed and old.get(k) != new.get(k))

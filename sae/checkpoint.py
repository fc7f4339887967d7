"""Trainer checkpoints: everything needed to continue bit-exactly (written atomically).

The state is plain data (tensors, numbers, strings, lists, dicts) and is read back with
`torch.load(weights_only=True)`, so a crafted checkpoint.pt cannot run code on `--resume`: its
pickle is refused with one line naming the file.

`out_dir` may be a local path or an fsspec URL (`memory://`, `s3://`, …); remote checkpoints are
written with one `pipe_file` (object stores replace whole objects, so a reader never sees half).

A latent-sharded run (`--shard-latents N`) writes one file per shard: shard 0's state in
checkpoint.pt, shard s's in checkpoint.shard{s}.step{STEP}.pt. The shard files are written first and
checkpoint.pt last; it names the step, so every rank resumes from files of one step even when a
crash hit between the writes (older shard files are removed once checkpoint.pt is in place)."""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import UserError
from saeforge.urls import join, resolve

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(out_dir: str | os.PathLike) -> Path | str:
    return join(out_dir, CHECKPOINT)


def checkpoint_exists(out_dir: str | os.PathLike, name: str = CHECKPOINT) -> bool:
    fs, root = resolve(out_dir)
    return Path(root, name).is_file() if fs is None else fs.isfile(f"{root}/{name}")


def remove_checkpoint(out_dir: str | os.PathLike, name: str = CHECKPOINT) -> None:
    fs, root = resolve(out_dir)
    if fs is None:
        Path(root, name).unlink(missing_ok=True)
    elif fs.isfile(f"{root}/{name}"):
        fs.rm_file(f"{root}/{name}")


def shard_checkpoint_name(shard: int, step: int) -> str:
    return f"checkpoint.shard{shard}.step{step}.pt"


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any], name: str = CHECKPOINT) -> Path | str:
    """torch.save to a temporary file then rename, so a crash mid-write keeps the previous one."""
    fs, root = resolve(out_dir)
    if fs is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{name}", buf.getvalue())
        return join(out_dir, name)
    p = Path(root) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)
    return p


def save_shard_checkpoint(out_dir: str | os.PathLike, shard: int, step: int, state: dict[str, Any]) -> Path | str:
    return save_checkpoint(out_dir, state, shard_checkpoint_name(shard, step))


def _shard_files(out_dir: str | os.PathLike) -> list[tuple[int, int, str]]:
    """(shard, step, file name) of every shard checkpoint file in out_dir."""
    fs, root = resolve(out_dir)
    names = ([p.name for p in Path(root).glob("checkpoint.shard*.pt")] if fs is None
             else [p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/checkpoint.shard*.pt")])
    out = []
    for n in names:
        m = re.fullmatch(r"checkpoint\.shard(\d+)\.step(\d+)\.pt", n)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), n))
    return out


def remove_shard_checkpoints(out_dir: str | os.PathLike, shard: int | None = None, keep_step: int | None = None
                             ) -> None:
    """Remove shard checkpoint files (of one shard, or all; all but `keep_step`'s)."""
    for s, step, name in _shard_files(out_dir):
        if (shard is None or s == shard) and step != keep_step:
            remove_checkpoint(out_dir, name)


def load_shard_checkpoint(out_dir: str | os.PathLike, shard: int, step: int) -> dict[str, Any]:
    """Shard `shard`'s state at `step` (the step checkpoint.pt names)."""
    name = shard_checkpoint_name(shard, step)
    if not checkpoint_exists(out_dir, name):
        raise UserError(f"--resume: {str(join(out_dir, name))!r} is missing: checkpoint.pt of this latent-sharded run "
                        f"is at step {step}, but shard {shard}'s file of that step is not there; copy the whole "
                        f"output directory (every checkpoint.shard*.pt) or start a new run in another --out")
    return load_checkpoint(out_dir, name)


def load_checkpoint(out_dir: str | os.PathLike, name: str = CHECKPOINT) -> dict[str, Any]:
    if name == CHECKPOINT and not checkpoint_exists(out_dir):
        raise UserError(f"--resume: no checkpoint in {str(out_dir)!r}; drop --resume to start a new run there")
    fs, root = resolve(out_dir)
    src: Any = Path(root) / name if fs is None else io.BytesIO(fs.cat_file(f"{root}/{name}"))
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--resume: {str(join(out_dir, name))!r} is not a saeforge checkpoint that loads as "
                        f"plain data ({first[:200]}); remove it or start the run in another --out") from None
    if not isinstance(state, dict) or "members" not in state:
        raise UserError(f"--resume: {str(join(out_dir, name))!r} is not a saeforge trainer checkpoint; remove "
                        f"it or start the run in another --out")
    return state


def config_changes(old: dict[str, Any], new: dict[str, Any], allowed: frozenset[str]) -> list[str]:
    """Names of config fields that differ, apart from those allowed to change on resume."""
    return sorted(k for k in set(old) | set(new) if k not in allowed and old.get(k) != new.get(k))

"""What the torchrun tests share: one small training run (as a TrainConfig and as CLI flags), a
free port for mp.spawn workers, and `torchrun … -m sae train`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from sae.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# 20 steps of 256 rows with latents dying within the run (AuxK engages), --data-lanes 2 so each of
# two data ranks reads only its share
RUN: dict[str, Any] = dict(k=[3], expansion=[4], tokens=256 * 20, batch_size=256, lr=[3e-3], dead_tokens=1024,
                           eval_every=10, log_every=5, scale_sample=2048, eval_rows=256, checkpoint_every=0,
                           wandb="disabled", quiet=True, threads=1, data_lanes=2)


def train_cfg(store: Any, out: Path | str, arch: list[str], **kw: Any) -> TrainConfig:
    return TrainConfig(store=store.path, out=str(out), arch=arch, **{**RUN, **kw})


def train_args(store: Any, out: Path | str, arch: list[str]) -> list[str]:
    """The flags of `train_cfg(store, out, arch)` for `saeforge train`."""
    return ["--store", store.path, "--out", str(out), "--arch", ",".join(arch), "--k", "3", "--expansion", "4",
            "--tokens", str(256 * 20), "--batch-size", "256", "--lr", "3e-3", "--dead-tokens", "1024",
            "--eval-every", "10", "--log-every", "5", "--scale-sample", "2048", "--eval-rows", "256",
            "--checkpoint-every", "0", "--wandb", "disabled", "--quiet", "--threads", "1", "--data-lanes", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(n: int, args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node n -m sae train ARGS` with one thread per rank."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "sae", "train", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

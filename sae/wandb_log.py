"""wandb run logging (offline by default: runs land in ./wandb and `wandb sync` uploads them)."""
from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]


class RunLogger:
    """Thin wrapper so `--wandb disabled` never imports wandb and the trainer has one call site."""

    def __init__(self, mode: WandbMode, project: str, config: dict[str, Any], name: str | None = None,
                 run_id: str | None = None, directory: str | None = None):
        self.mode = mode
        self.run = None
        self.run_id = run_id
        if mode == "disabled":
            return
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, config=config, name=name, mode=mode, id=run_id,
                              resume="allow" if run_id else None, dir=directory or os.getcwd(),
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def histogram(self, key: str, values: np.ndarray, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Histogram(values.tolist())}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

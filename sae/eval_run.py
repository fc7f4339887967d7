"""`saeforge eval` as a library call: evaluate a saved SAE on a store, write eval.json, log to wandb.

    from sae.eval_run import EvalConfig, run_eval
    result, path = run_eval(EvalConfig(sae="runs/quickstart/sae", ce_tokens=4096))

The SAE directory and the output may be local paths or fsspec URLs (eval.json is written beside
the SAE through the same path layer the SAE was read with).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import saeforge
from collect.store import Split
from saeforge.config import check_choices, config_dict, option
from saeforge.devices import check_device, torch_device
from saeforge.errors import UserError
from saeforge.urls import check_output_file, join, write_json
from sae.wandb_log import WandbMode

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    sae: str = option("", "SAE directory written by `saeforge train` (path or fsspec URL)", positional=True)
    store: str = option("", "activation store (default: the store recorded in cfg.json)")
    tokens: int = option(100_000, "keep rows of the split for reconstruction metrics (0: all)")
    ce_tokens: int = option(4096, "tokens of whole sequences for CE/KL with the SAE spliced in (0: skip; needs the model)")
    ce_batch_tokens: int = option(512, "clean tokens per forward (each runs 3 copies)")
    split: Split = option("heldout", "rows to evaluate: held-out, training or all rows")
    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    wandb: WandbMode = option("offline", "online, offline or disabled (logs only if cfg.json has a run id)")
    out: str = option("", "eval JSON path or URL (default SAE_DIR/eval.json)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        check_choices(self)
        if not self.sae:
            raise UserError("give the SAE directory: saeforge eval SAE_DIR [--store STORE.zarr]")
        if self.tokens < 0 or self.ce_tokens < 0:
            raise UserError(f"--tokens {self.tokens} / --ce-tokens {self.ce_tokens} must be >= 0")
        if self.ce_batch_tokens < 1:
            raise UserError(f"--ce-batch-tokens {self.ce_batch_tokens} must be >= 1")
        check_device(self.device)
        if self.out:
            check_output_file(self.out)


def wandb_run(cfg: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(run id, project, dir) recorded in cfg.json by the trainer, if any."""
    w: dict[str, Any] = cfg["wandb"] if isinstance(cfg.get("wandb"), dict) else {}
    run_id = cfg.get("wandb_run_id") or w.get("run_id")
    project = cfg.get("wandb_project") or w.get("project") or (cfg.get("config") or {}).get("wandb_project") or "saeforge"
    return run_id, project, cfg.get("wandb_dir") or w.get("dir")


def log_to_wandb(metrics: dict[str, Any], cfg: dict[str, Any], mode: WandbMode) -> str | None:
    """Resume the SAE's run and put the metrics in its summary (eval/…) and history; returns the id."""
    run_id, project, directory = wandb_run(cfg)
    if mode == "disabled" or not run_id:
        return None
    from sae.wandb_log import RunLogger
    logger = RunLogger(mode, project, {}, run_id=run_id,
                       directory=directory if directory and os.path.isdir(directory) else None)
    scalars = {f"eval/{k}": v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)}
    logger.summary(scalars)
    run = logger.run
    if run is not None:
        import numpy as np
        import wandb
        h = metrics.get("latent_density_hist")
        payload: dict[str, Any] = dict(scalars)
        if h:
            payload["eval/log10_latent_density"] = wandb.Histogram(
                np_histogram=(np.asarray(h["counts"]), np.asarray(h["log10_edges"])))
        run.log(payload)
    logger.finish()
    return run_id


def run_eval(cfg: EvalConfig) -> tuple[dict[str, Any], str]:
    """Evaluate the SAE at `cfg.sae`, write eval.json beside it (or to `cfg.out`), log to its wandb run."""
    import torch

    from collect.store import Store
    from sae.evaluate import evaluate_sae, load_store_model
    from sae.io import check_store_points, load_sae, read_cfg

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch_device(cfg.device)
    sae_dir = cfg.sae
    scfg = read_cfg(sae_dir)
    store_path = cfg.store or scfg.get("store")
    if not store_path:
        raise UserError(f"no store given and {sae_dir}/cfg.json records none; pass --store STORE.zarr")
    store = Store.open(store_path)
    ins, outs = check_store_points(scfg, store, sae_dir)
    sae = load_sae(sae_dir, device=cfg.device)
    model = load_store_model(store, device=cfg.device) if cfg.ce_tokens > 0 else None
    t0 = time.perf_counter()
    m = evaluate_sae(sae, store, ins, tokens=cfg.tokens or None, ce_tokens=cfg.ce_tokens, model=model,
                     split=cfg.split, ce_batch_tokens=cfg.ce_batch_tokens, quiet=cfg.quiet,
                     target=outs[0] if sae.cfg.transcoder else None)
    result = {"sae_dir": str(sae_dir), "model": store.model_spec, "model_hash": store.model_hash,
              "metrics": m, "eval_seconds": round(time.perf_counter() - t0, 2),
              "config": config_dict(cfg), "saeforge_version": saeforge.__version__}
    out = cfg.out or join(sae_dir, "eval.json")
    write_json(out, result, indent=2)
    result["wandb_run_id"] = log_to_wandb(m, scfg, cfg.wandb)
    return result, out

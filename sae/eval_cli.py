"""`saeforge eval SAE_DIR [--store S.zarr] [--tokens N] [--ce-tokens N] [--device cpu]`.

Prints a table, writes SAE_DIR/eval.json and, when cfg.json records a wandb run id, logs the
metrics to that run (resumed with `wandb.init(id=..., resume="allow")`, offline by default).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from saeforge.config import add_config_arguments, build_config, config_dict, load_toml_section
from saeforge.errors import UserError

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class EvalConfig:
    store: str = field(default="", metadata={"help": "activation store (default: the store recorded in cfg.json)"})
    tokens: int = field(default=100_000, metadata={"help": "keep rows of the split for reconstruction metrics (0: all)"})
    ce_tokens: int = field(default=4096, metadata={"help": "tokens of whole sequences for CE/KL with the SAE spliced in (0: skip; needs the model)"})
    ce_batch_tokens: int = field(default=512, metadata={"help": "clean tokens per forward (each runs 3 copies)"})
    split: str = field(default="heldout", metadata={"help": "heldout (default), train or all"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:i]"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    wandb: str = field(default="offline", metadata={"help": "online, offline or disabled (logs only if cfg.json has a run id)"})
    out: str = field(default="", metadata={"help": "eval JSON path (default SAE_DIR/eval.json)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def validate(self) -> None:
        if self.tokens < 0 or self.ce_tokens < 0:
            raise UserError(f"--tokens {self.tokens} / --ce-tokens {self.ce_tokens} must be >= 0")
        if self.ce_batch_tokens < 1:
            raise UserError(f"--ce-batch-tokens {self.ce_batch_tokens} must be >= 1")
        if self.split not in ("heldout", "train", "all"):
            raise UserError(f"--split {self.split!r} is unknown; use heldout, train or all")
        if self.wandb not in WANDB_MODES:
            raise UserError(f"--wandb {self.wandb!r}: use one of {', '.join(WANDB_MODES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise UserError(f"--device {self.device!r}: use cpu or cuda")


def _parse(argv: Sequence[str] | None) -> tuple[str, EvalConfig]:
    p = argparse.ArgumentParser(prog="saeforge eval", description="evaluate an SAE: reconstruction, sparsity, "
                                "CE loss recovered and KL with the SAE spliced into the model")
    p.add_argument("paths", nargs="+", metavar="[CONFIG.toml] SAE_DIR", help="SAE directory written by `saeforge train`")
    add_config_arguments(p, EvalConfig)
    ns = p.parse_args(argv)
    paths = list(ns.paths)
    toml = paths.pop(0) if len(paths) == 2 and paths[0].endswith(".toml") else None
    if len(paths) != 1:
        raise UserError(f"expected one SAE directory, got {paths}; usage: saeforge eval SAE_DIR --store STORE.zarr")
    return paths[0], build_config(EvalConfig, load_toml_section(toml, "eval"), vars(ns))


def check_match(cfg: dict[str, Any], store: Any, sae_dir: str) -> str:
    """The SAE's hook point, after checking the store is from the same model, hook and width."""
    hook = cfg.get("hook_point")
    if not hook:
        raise UserError(f"{sae_dir}/cfg.json records no hook_point; pass an SAE directory written by `saeforge train`")
    if hook not in store.hooks:
        raise UserError(f"the SAE in {sae_dir!r} was trained on hook {hook!r}, but store {store.path!r} holds "
                        f"{store.hooks}; pass a store collected at {hook} (saeforge collect --hooks {hook})")
    mh = cfg.get("model_hash")
    if mh and mh != store.model_hash:
        raise UserError(f"the SAE in {sae_dir!r} was trained on model {cfg.get('model')!r} (weights hash {mh}) but "
                        f"store {store.path!r} comes from {store.model_spec!r} (hash {store.model_hash}); pass a "
                        f"store collected with the SAE's model")
    if int(cfg.get("d_in", store.d_model)) != store.d_model:
        raise UserError(f"the SAE takes d_in={cfg.get('d_in')} but store {store.path!r} has d_model={store.d_model}")
    return hook


def wandb_run(cfg: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(run id, project, dir) recorded in cfg.json by the trainer, if any."""
    w = cfg.get("wandb") if isinstance(cfg.get("wandb"), dict) else {}
    run_id = cfg.get("wandb_run_id") or w.get("run_id")
    project = cfg.get("wandb_project") or w.get("project") or (cfg.get("config") or {}).get("wandb_project") or "saeforge"
    return run_id, project, cfg.get("wandb_dir") or w.get("dir")


def log_to_wandb(metrics: dict[str, Any], cfg: dict[str, Any], mode: str) -> str | None:
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


ROWS = [
    ("reconstruction (keep rows)", None),
    ("fvu", "FVU  Σ‖x−x̂‖²/Σ‖x−x̄‖²"), ("explained_variance", "explained variance 1−FVU"),
    ("mse", "MSE per element"), ("sq_err_per_token", "‖x−x̂‖² per token"), ("cossim", "cosine(x, x̂)"),
    ("l2_ratio", "‖x̂‖/‖x‖"), ("n_rows", "rows"),
    ("with norm outliers / all rows", None),
    ("with_outliers_fvu", "FVU keep + norm outliers"), ("n_outlier_rows", "norm-outlier rows"), ("n_outlier_rows_at_pos0", "  of which at pos 0 (BOS)"),
    ("all_rows_fvu", "FVU every row (BOS, specials too)"), ("all_rows_n_rows", "rows"),
    ("sparsity", None),
    ("l0", "L0 (active latents/token)"), ("dead_fraction", "dead latents (never fired)"),
    ("dense_fraction", "dense latents (>10% of tokens)"),
    ("downstream (model with SAE spliced in)", None),
    ("ce_loss_clean", "CE clean"), ("ce_loss_sae", "CE with SAE"), ("ce_loss_zero", "CE zero-ablated"),
    ("ce_loss_score", "CE loss recovered"), ("kl_div_sae", "KL(clean‖SAE)"), ("kl_div_zero", "KL(clean‖zero)"),
    ("kl_div_score", "KL score"), ("ce_positions", "predicted positions"),
]


def format_table(m: dict[str, Any]) -> str:
    lines = []
    header = None
    for key, label in ROWS:
        if label is None:
            header = key
            continue
        if key not in m:
            continue
        if header is not None:
            lines.append(f"\n{header}")
            header = None
        v = m[key]
        s = "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.6g}")
        lines.append(f"  {label:<36} {s:>14}")
    h = m.get("latent_density_hist")
    if h:
        lines.append("\nlatent density (log10 bins)")
        lines.append(f"  {'dead':<36} {h['dead']:>14,}")
        e = h["log10_edges"]
        for i, c in enumerate(h["counts"]):
            if c:
                close = "]" if i == len(h["counts"]) - 1 else ")"
                lines.append(f"  [{e[i]:+.1f}, {e[i + 1]:+.1f}{close}{'':<24} {c:>14,}")
    return "\n".join(lines).lstrip("\n")


def run_eval(sae_dir: str, cfg: EvalConfig) -> tuple[dict[str, Any], Path]:
    import torch

    from collect.store import Store
    from sae.evaluate import evaluate_sae, load_store_model
    from sae.io import load_sae, read_cfg

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device} but no CUDA device is available; use --device cpu")
    scfg = read_cfg(sae_dir)
    store_path = cfg.store or scfg.get("store")
    if not store_path:
        raise UserError(f"no store given and {sae_dir}/cfg.json records none; pass --store STORE.zarr")
    store = Store.open(store_path)
    hook = check_match(scfg, store, sae_dir)
    sae = load_sae(sae_dir, device=cfg.device)
    model = load_store_model(store, device=cfg.device) if cfg.ce_tokens > 0 else None
    t0 = time.perf_counter()
    m = evaluate_sae(sae, store, hook, tokens=cfg.tokens or None, ce_tokens=cfg.ce_tokens, model=model,
                     split=cfg.split, ce_batch_tokens=cfg.ce_batch_tokens, quiet=cfg.quiet)
    import saeforge
    result = {"sae_dir": str(sae_dir), "model": store.model_spec, "model_hash": store.model_hash,
              "metrics": m, "eval_seconds": round(time.perf_counter() - t0, 2),
              "config": config_dict(cfg), "saeforge_version": saeforge.__version__}
    out = Path(cfg.out) if cfg.out else Path(sae_dir) / "eval.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)
    result["wandb_run_id"] = log_to_wandb(m, scfg, cfg.wandb)
    return result, out


def main(argv: Sequence[str] | None = None) -> int:
    sae_dir, cfg = _parse(argv)
    result, out = run_eval(sae_dir, cfg)
    print(format_table(result["metrics"]))
    print(f"\nwrote {out}" + (f"; logged to wandb run {result['wandb_run_id']}" if result["wandb_run_id"] else ""))
    return 0

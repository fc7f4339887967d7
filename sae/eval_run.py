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
from typing import Any, Literal

import saeforge
from collect.store import Split
from saeforge.config import check_choices, config_dict, option
from saeforge.devices import check_device, torch_device
from saeforge.errors import UserError
from saeforge.urls import check_output_file, is_url, join, write_json
from sae.bootstrap import CI_SUFFIX, BootstrapSpec
from sae.probe_tasks import BUILTIN_TASKS
from sae.wandb_log import WandbMode

log = logging.getLogger(__name__)


Suite = Literal["basic", "full"]


@dataclass
class EvalConfig:
    sae: str = option("", "SAE directory written by `saeforge train` (path or fsspec URL)", positional=True)
    more: list[str] = option([], "more SAE directories, evaluated in turn (side by side with --compare)",
                             positional=True)
    store: str = option("", "activation store (default: the store recorded in cfg.json)")
    suite: Suite = option("basic", "basic: reconstruction, sparsity, CE/KL; full: + sparse probing, feature "
                                   "absorption and a Markdown report with plots")
    tokens: int = option(100_000, "keep rows of the split for reconstruction metrics (0: all)")
    ce_tokens: int = option(4096, "tokens of whole sequences for CE/KL with the SAE spliced in (0: skip; needs the model)")
    ce_batch_tokens: int = option(512, "clean tokens per forward (each runs 3 copies)")
    split: Split = option("heldout", "rows to evaluate: held-out, training or all rows")
    bootstrap: int = option(1000, "bootstrap resamples for the 95% intervals over held-out sequences (0: none)")
    seed: int = option(0, "seed of the bootstrap, the probing splits and the word sample")
    min_sequences: int = option(20, "fewest independent units (sequences, windows, words) an interval is drawn from")
    probe_tasks: list[str] = option(list(BUILTIN_TASKS), "probing tasks: built-in names and/or JSONL files of "
                                                         "{\"text\": ..., \"label\": ...} lines (full suite)")
    probe_windows: int = option(256, "windows per corpus for the built-in probing tasks")
    probe_context: int = option(64, "tokens per probing window (BOS included)")
    probe_ks: list[int] = option([1, 2, 5, 20], "numbers of SAE latents in the sparse probes")
    prose_corpus: str = option("", "prose corpus of the probing tasks (default: ../shared/data/wikitext-2/valid.txt)")
    absorption_words: int = option(8000, "single-token vocabulary words sampled for the absorption eval (full suite)")
    compare: bool = option(False, "put every SAE side by side (intervals; mean ± sd across seed replicas)")
    compare_dir: str = option("eval_compare", "where --compare writes compare.json and compare.md")
    reuse: bool = option(False, "take an SAE's eval.json instead of evaluating when it has the same settings")
    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    wandb: WandbMode = option("offline", "online, offline or disabled (logs only if cfg.json has a run id)")
    out: str = option("", "eval JSON path or URL (default SAE_DIR/eval.json; one SAE only)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        check_choices(self)
        if not self.sae:
            raise UserError("give the SAE directory: saeforge eval SAE_DIR [--store STORE.zarr]")
        if self.tokens < 0 or self.ce_tokens < 0:
            raise UserError(f"--tokens {self.tokens} / --ce-tokens {self.ce_tokens} must be >= 0")
        if self.ce_batch_tokens < 1:
            raise UserError(f"--ce-batch-tokens {self.ce_batch_tokens} must be >= 1")
        if self.bootstrap < 0 or self.min_sequences < 2:
            raise UserError(f"--bootstrap {self.bootstrap} must be >= 0 and --min-sequences {self.min_sequences} >= 2")
        if self.probe_windows < 1 or self.probe_context < 4 or self.absorption_words < 50:
            raise UserError(f"--probe-windows {self.probe_windows} must be >= 1, --probe-context {self.probe_context} "
                            f">= 4 and --absorption-words {self.absorption_words} >= 50")
        if not self.probe_ks or any(k < 1 for k in self.probe_ks):
            raise UserError(f"--probe-ks {self.probe_ks} must be positive integers, e.g. 1,2,5,20")
        if self.out and self.more:
            raise UserError("--out names one eval.json; with several SAEs each writes SAE_DIR/eval.json (drop --out)")
        if self.compare and not self.more:
            raise UserError("--compare needs at least two SAE directories: saeforge eval A B [C …] --compare")
        check_device(self.device)
        if self.out:
            check_output_file(self.out)

    @property
    def sae_dirs(self) -> list[str]:
        return [self.sae, *self.more]

    def ci(self, strict: bool) -> BootstrapSpec:
        return BootstrapSpec(self.bootstrap, self.seed, self.min_sequences, strict)


def wandb_run(cfg: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(run id, project, dir) recorded in cfg.json by the trainer, if any."""
    w: dict[str, Any] = cfg["wandb"] if isinstance(cfg.get("wandb"), dict) else {}
    run_id = cfg.get("wandb_run_id") or w.get("run_id")
    project = cfg.get("wandb_project") or w.get("project") or (cfg.get("config") or {}).get("wandb_project") or "saeforge"
    return run_id, project, cfg.get("wandb_dir") or w.get("dir")


def log_to_wandb(metrics: dict[str, Any], cfg: dict[str, Any], mode: WandbMode,
                 images: dict[str, str] | None = None) -> str | None:
    """Resume the SAE's run and put the metrics in its summary (eval/…) and history, with the report's
    plots as images; returns the run id."""
    run_id, project, directory = wandb_run(cfg)
    if mode == "disabled" or not run_id:
        return None
    from sae.wandb_log import RunLogger
    logger = RunLogger(mode, project, {}, run_id=run_id,
                       directory=directory if directory and os.path.isdir(directory) else None)
    scalars: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            scalars[f"eval/{k}"] = v
        elif k.endswith(CI_SUFFIX) and isinstance(v, list) and len(v) == 2:  # intervals as …_ci95_lo / …_ci95_hi
            scalars[f"eval/{k}_lo"], scalars[f"eval/{k}_hi"] = v
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
        for name, path in (images or {}).items():
            payload[f"eval/{name}"] = wandb.Image(path)
        run.log(payload)
    logger.finish()
    return run_id


class SharedInputs:
    """What several SAEs of one command share: the model, and its activations on the probing windows
    and vocabulary words, per (model hash, hook point)."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.pools: dict[tuple[str, str, str], Any] = {}

    def model(self, store: Any, device: str) -> tuple[Any, float]:
        from sae.evaluate import load_store_model
        t0 = time.perf_counter()
        if store.model_hash not in self.models:
            self.models[store.model_hash] = load_store_model(store, device=device)
        return self.models[store.model_hash], time.perf_counter() - t0

    def pool(self, kind: str, store: Any, hook: str, build: Any) -> tuple[Any, float]:
        """(pool, seconds spent building it now: 0 when another SAE already built it)."""
        key = (kind, store.model_hash, hook)
        if key in self.pools:
            return self.pools[key], 0.0
        self.pools[key] = build()
        return self.pools[key], self.pools[key].seconds


SAME_SETTINGS = ("suite", "tokens", "ce_tokens", "split", "bootstrap", "seed", "min_sequences", "probe_tasks",
                 "probe_windows", "probe_context", "probe_ks", "prose_corpus", "absorption_words")


def _reusable(path: str, cfg: EvalConfig, store_path: str) -> dict[str, Any] | None:
    """An existing eval.json written with the same settings on the same store, if any."""
    from saeforge.urls import is_file, read_json
    if not cfg.reuse or not is_file(path):
        return None
    old = read_json(path, "eval result")
    oc = old.get("config") or {}
    same = all(oc.get(k) == getattr(cfg, k) for k in SAME_SETTINGS) and old.get("metrics", {}).get("store") == store_path
    return old if same else None


def run_eval(cfg: EvalConfig, strict: bool = False, sae_dir: str | None = None,
             shared: SharedInputs | None = None) -> tuple[dict[str, Any], str]:
    """Evaluate one SAE (`sae_dir`, default `cfg.sae`), write eval.json beside it (or to `cfg.out`) and
    the report (full suite), log to its wandb run.

    strict: too few held-out sequences for the intervals is a UserError (the CLI); otherwise a
    logged warning and no intervals (the trainer's final evaluation on small stores)."""
    import torch

    from collect.store import Store
    from sae.evaluate import evaluate_sae, outlier_threshold
    from sae.io import check_store_points, load_sae, read_cfg

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch_device(cfg.device)
    sae_dir = sae_dir or cfg.sae
    shared = shared or SharedInputs()
    scfg = read_cfg(sae_dir)
    store_path = cfg.store or scfg.get("store")
    if not store_path:
        raise UserError(f"no store given and {sae_dir}/cfg.json records none; pass --store STORE.zarr")
    out = cfg.out or join(sae_dir, "eval.json")
    old = _reusable(out, cfg, str(store_path))
    if old is not None:
        log.info("reusing %s (same settings)", out)
        old["wandb_run_id"] = None
        return old, out
    store = Store.open(store_path)
    ins, outs = check_store_points(scfg, store, sae_dir)
    sae = load_sae(sae_dir, device=cfg.device)
    if cfg.suite == "full" and sae.cfg.n_layers > 1:
        raise UserError(f"--suite full probes the latents of one hook point; the crosscoder {sae_dir} reads "
                        f"{len(ins)} ({','.join(ins)}): use --suite basic")
    ci = cfg.ci(strict)
    full = cfg.suite == "full"
    if full:  # bad task files and a missing prose corpus fail before any model time is spent
        from sae.eval_suite import prose_corpus
        from sae.probe_tasks import read_task_file
        for t in cfg.probe_tasks:
            if t not in BUILTIN_TASKS:
                read_task_file(t)
        if any(t in BUILTIN_TASKS for t in cfg.probe_tasks):
            prose_corpus(cfg.prose_corpus)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = None
    if cfg.ce_tokens > 0 or full:
        model, timings["load_model"] = shared.model(store, cfg.device)
    m = evaluate_sae(sae, store, ins, tokens=cfg.tokens or None, ce_tokens=cfg.ce_tokens, model=model,
                     split=cfg.split, ce_batch_tokens=cfg.ce_batch_tokens, quiet=cfg.quiet, ci=ci,
                     target=outs[0] if sae.cfg.transcoder else None)
    timings["reconstruction"] = m["recon_seconds"]
    if "ce_seconds" in m:
        timings["ce_kl"] = m["ce_seconds"]
    result: dict[str, Any] = {"sae_dir": str(sae_dir), "model": store.model_spec, "model_hash": store.model_hash,
                              "suite": cfg.suite, "metrics": m}
    if full:
        from sae.eval_suite import build_probe_pool, build_word_pool, run_absorption, run_probing
        hook = ins[0]  # probing and absorption read the latents of the point the dictionary reads
        bound = outlier_threshold(store, hook)
        log.info("%s: probing windows (%d per corpus) through the model", sae_dir, cfg.probe_windows)
        pool, timings["probe_activations"] = shared.pool("probe", store, hook,
                                                         lambda: build_probe_pool(model, hook, cfg, bound))
        t1 = time.perf_counter()
        log.info("%s: fitting probes on %d tasks", sae_dir, len(pool.tasks))
        result["probing"], flat = run_probing(sae, pool, cfg, ci)
        m.update(flat)
        timings["probing"] = time.perf_counter() - t1
        log.info("%s: %d vocabulary words through the model", sae_dir, cfg.absorption_words)
        words, timings["absorption_activations"] = shared.pool("words", store, hook,
                                                               lambda: build_word_pool(model, hook, cfg, bound))
        t1 = time.perf_counter()
        log.info("%s: absorption probes", sae_dir)
        result["absorption"], flat = run_absorption(sae, words, ci)
        m.update(flat)
        timings["absorption"] = time.perf_counter() - t1
    result.update({"eval_seconds": round(time.perf_counter() - t0, 2), "timings": {k: round(v, 2) for k, v in
                   timings.items()}, "config": config_dict(cfg), "saeforge_version": saeforge.__version__})
    images: dict[str, str] = {}
    if full:
        from sae.eval_report import PLOTS, write_report
        t1 = time.perf_counter()
        report_dir = str(sae_dir) if not cfg.out else os.path.dirname(str(cfg.out)) or "."
        result["report"] = write_report(result, report_dir)
        result["timings"]["report"] = round(time.perf_counter() - t1, 2)
        if not is_url(report_dir):
            images = {p[:-4]: os.path.join(report_dir, PLOTS, p) for p in sorted(os.listdir(os.path.join(report_dir, PLOTS)))}
    write_json(out, result, indent=2)
    result["wandb_run_id"] = log_to_wandb(m, scfg, cfg.wandb, images)
    return result, out


def run_evals(cfg: EvalConfig, strict: bool = False) -> list[tuple[dict[str, Any], str]]:
    """`run_eval` on every SAE of `cfg` in turn, sharing the model and its probing activations."""
    shared = SharedInputs()
    return [run_eval(cfg, strict, d, shared) for d in cfg.sae_dirs]

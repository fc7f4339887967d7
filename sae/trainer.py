"""Train one SAE, or a sweep of them, from one pass over an activation store.

Every SAE sees the same batches (read once). Per step: decoder renormalisation, FVU (+AuxK/L1/L0)
loss, decoder-gradient projection, grad clip, the optimizer step (sae/optim.py) at the lr of its
schedule and dead-latent counters. Evaluation and saving use the weights the optimizer means for
inference (the averaged ones for schedule-free optimizers, formed from the parameters as the last
step left them: renormalising before the forward rather than after the step, as sparsify does,
scored 0.1695 held-out FVU against 0.1708 from one shared init; README, Performance). Checkpoints
every N tokens and on SIGINT/SIGTERM hold everything needed for `--resume` to end with the same
weights as an uninterrupted run.

Under torchrun the ranks train data-parallel (sae/distributed.py); with `--shard-latents N` each SAE's
latents are split across N ranks (sae/sharded.py) and the rest of the ranks are data-parallel over
those shards (a 2-D mesh). A sharded run checkpoints one file per shard (checkpoint.pt names the step
every shard file belongs to) and saves one ordinary SAE directory, gathered from the shards.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from collect.store import Store
from sae import distributed as ddp
from sae.architectures import SAE, TOPK_FAMILY, build_sae
from sae.checkpoint import (
    checkpoint_exists,
    config_changes,
    load_checkpoint,
    load_shard_checkpoint,
    remove_checkpoint,
    remove_shard_checkpoints,
    save_checkpoint,
    save_shard_checkpoint,
)
from sae.config import RESUMABLE_CHANGES, SweepMember, TrainConfig, sweep_members
from sae.evaluate import evaluate_rows
from sae.init import geometric_median, unit_norm_scale
from sae.io import save_sae
from sae.loader import ShuffledLoader, check_widths, heldout_rows, sample_rows
from sae.optim import SCHEDULE_FREE, TrainOptimizer
from sae.schedule import lr_at, warmup_steps_for
from sae.sharded import ShardedTopK
from sae.wandb_log import RunLogger
from saeforge.config import config_dict
from saeforge.devices import torch_device
from saeforge.errors import UserError
from saeforge.progress import progress
from saeforge.locks import exclusive
from saeforge.urls import check_output_dir, is_url, join

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One SAE being trained, with its optimizer and dead-latent counter."""
    spec: SweepMember
    sae: SAE | ShardedTopK  # a ShardedTopK holds this rank's latents of one SAE (--shard-latents)
    opt: TrainOptimizer
    since_fired: torch.Tensor  # int64 [d_sae] (this rank's latents if sharded): tokens since each last fired
    window_counts: torch.Tensor  # int64 [d_sae] (idem): fires since the last density histogram
    last: dict[str, Any] = field(default_factory=dict)  # detached tensors: read (synced) at log steps only


@dataclass
class TrainResult:
    out_dirs: list[Path | str]  # str for URL outputs
    metrics: dict[str, dict[str, float]]
    tokens: int
    interrupted: bool
    tokens_per_s: float


class Trainer:
    def __init__(self, cfg: TrainConfig, on_step: Callable[["Trainer"], None] | None = None):
        self.cfg = cfg
        self.on_step = on_step
        self.stop_requested = False
        check_output_dir(cfg.out)  # a file or unwritable --out fails now, not after training
        torch_device(cfg.device)  # --device cuda without CUDA: one line, before any process group or file
        self.dist, device = ddp.setup(cfg.device)  # WORLD_SIZE > 1 under torchrun: data parallel
        self.mesh = ddp.latent_mesh(self.dist, cfg.shard_latents, device)  # data × shard ranks
        if self.mesh.data_world > 1 and cfg.batch_size % self.mesh.data_world:
            raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the number of data-parallel ranks "
                            f"({self.mesh.data_world})")
        self.device = torch.device(device)
        # autocast of the SAE forward (the dense encoder matmul; sparse parts and weights stay float32)
        self.autocast_dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # Adam moments and small latents underflow to subnormals, which slow CPU kernels ~10×
        torch.set_flush_denormal(True)
        self.store = Store.open(cfg.store)
        if not cfg.hook and not cfg.hooks:
            if len(self.store.hooks) != 1:
                raise UserError(f"store {cfg.store!r} holds hooks {self.store.hooks}; choose one with --hook")
            cfg.hook = self.store.hooks[0]
        for flag, hooks in (("--hook", [cfg.hook] if cfg.hook else []), ("--hooks", cfg.hooks),
                            ("--target", [cfg.target] if cfg.target else [])):
            for h in hooks:
                if h not in self.store.hooks:
                    raise UserError(f"hook point {h!r} ({flag}) is not in store {cfg.store!r}; it holds "
                                    f"{self.store.hooks}; pass one of them with {flag}, or collect {h} into the "
                                    f"store (saeforge collect --hooks {','.join([*self.store.hooks, h])})")
        if not self.store.complete:
            log.warning("store %s is not complete (collection still running or interrupted); training on its "
                        "%d committed rows", cfg.store, self.store.n_tokens)
        self.data_hooks = cfg.data_hooks  # per row: the inputs side by side, then a transcoder's target
        what = "--arch crosscoder" if cfg.hooks else ("a transcoder (--hook, --target)" if cfg.target else "an SAE")
        self.d_in = check_widths(self.store, self.data_hooks, what)
        self.specs = sweep_members(cfg, self.d_in)
        for spec in self.specs:
            if spec.arch.arch in TOPK_FAMILY and spec.arch.k > spec.arch.d_sae:
                raise UserError(f"--k {spec.arch.k} is larger than the dictionary ({spec.arch.d_sae} latents at "
                                f"--expansion {spec.arch.d_sae // self.d_in}); use a smaller --k or a larger "
                                f"--expansion")
            if spec.arch.d_sae % self.mesh.shards:
                raise UserError(f"--shard-latents {self.mesh.shards} does not divide the dictionary "
                                f"({spec.arch.d_sae} latents at --expansion {spec.arch.d_sae // self.d_in}); choose "
                                f"a shard count that divides d_sae")
        self.out: Path | str = cfg.out if is_url(cfg.out) else Path(cfg.out)  # URLs stay strings
        self.step = 0
        self.position = 0
        self.scale = 1.0
        self.scales: list[float] = [1.0] * len(self.data_hooks)  # unit mean ‖x‖² per hook (self.scale: the first)
        self.members: list[Member] = []
        self.wandb_id: str | None = None
        self.elapsed = 0.0

    # ---- state ---------------------------------------------------------------------------
    def _init_fresh(self) -> None:
        cfg = self.cfg
        if checkpoint_exists(self.out):
            raise UserError(f"{str(self.out)!r} holds the checkpoint of an interrupted run; pass --resume to "
                            f"continue it, or choose another --out")
        torch.manual_seed(cfg.data_seed)
        sample = torch.from_numpy(sample_rows(self.store, self.data_hooks, cfg.scale_sample, cfg.data_seed))
        if len(sample) == 0:
            raise UserError(f"store {cfg.store!r} has no training rows (all rows are held out or keep=False)")
        if not torch.isfinite(sample).all():
            raise UserError(f"store {cfg.store!r} hook {','.join(self.data_hooks)!r} has NaN/inf activations; "
                            f"recollect it (e.g. with --dtype float32)")
        d = self.d_in
        self.scales = [unit_norm_scale(sample[:, j * d:(j + 1) * d]) for j in range(len(self.data_hooks))]
        self.scale = self.scales[0]
        sample = self._scaled(sample)
        centre = (lambda rows: geometric_median(rows[:16384])) if cfg.init_b_dec == "median" else (lambda rows: rows.mean(0))
        x_sample, y_sample = self._split(sample)
        b_dec = centre(x_sample if y_sample is None else y_sample)
        b_in = centre(x_sample) if y_sample is not None else None
        for spec in self.specs:
            gen = torch.Generator().manual_seed(spec.init_seed)
            sharded = self.mesh.shards > 1  # every rank builds the whole SAE on the CPU and keeps its slice
            sae = build_sae(spec.arch, b_dec=b_dec, generator=gen, device="cpu" if sharded else self.device).train()
            if cfg.init_enc_scale != 1.0:
                with torch.no_grad():
                    sae.enc.mul_(cfg.init_enc_scale)
            if b_in is not None:
                sae.centre_input(b_in.to(self.device))
            self.members.append(self._member(spec, self._shard(sae) if sharded else sae))
        self._sync_members()

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the data hooks (side by side) at unit mean squared norm per hook, in place."""
        if len(self.scales) == 1:
            return rows.mul_(self.scale)
        col = torch.tensor(self.scales, dtype=rows.dtype, device=rows.device)
        return rows.view(rows.shape[0], len(self.scales), -1).mul_(col[:, None]).view(rows.shape)

    def _scale_columns(self, rows: torch.Tensor) -> torch.Tensor | float:
        if len(self.scales) == 1:
            return self.scale
        return torch.tensor(self.scales, dtype=rows.dtype, device=rows.device).repeat_interleave(self.d_in)

    def _split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input, a transcoder's target or None) of a batch of data-hook rows."""
        if not self.cfg.target:
            return rows, None
        return rows[:, :-self.d_in], rows[:, -self.d_in:]

    def _shard(self, sae: SAE) -> ShardedTopK:
        """This rank's latents of a whole SAE, on the training device."""
        return ShardedTopK.from_full(sae, self.mesh.shard_index, self.mesh.shards, self.mesh.shard_group
                                     ).to(self.device).train()

    def _sync_members(self) -> None:
        if self.mesh.data_world > 1:  # the same shard on every data rank (all ranks when unsharded)
            for m in self.members:
                ddp.broadcast_module(m.sae, self.mesh.data_group)

    def _member(self, spec: SweepMember, sae: SAE | ShardedTopK) -> Member:
        n = spec.arch.d_sae // self.mesh.shards
        z = lambda: torch.zeros(n, dtype=torch.int64, device=self.device)  # noqa: E731
        opt = TrainOptimizer(spec.optimizer, list(sae.named_parameters()), spec.lr, momentum=self.cfg.momentum,
                             bias_lr_scale=self.cfg.bias_lr_scale)
        return Member(spec, sae, opt, z(), z())

    def _resume(self) -> None:
        ck = load_checkpoint(self.out)
        old = {**config_dict(TrainConfig()), **ck["config"]}  # fields newer than the checkpoint: their defaults
        changed = config_changes(old, config_dict(self.cfg), RESUMABLE_CHANGES)
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {config_dict(self.cfg).get(k)!r}" for k in changed)
            raise UserError(f"--resume with a changed config ({diffs}); rerun with the original settings or "
                            f"start a new run in another --out")
        shards, world = int(ck.get("shards", 1)), int(ck.get("world", 1))
        if shards > 1 and world != self.dist.world:
            raise UserError(f"--resume: {str(self.out)!r} was trained latent-sharded over {world} ranks "
                            f"({shards} shards); resume it with the same rank count (torchrun ... WORLD_SIZE={world}),"
                            f" not {self.dist.world}")
        if self.mesh.shard_index > 0:  # this rank's latents are in its shard's file of the same step
            ck = {**ck, "members": load_shard_checkpoint(self.out, self.mesh.shard_index, ck["step"])["members"]}
        self.step, self.position, self.scale = ck["step"], ck["position"], ck["scale"]
        self.scales = list(ck.get("scales", [self.scale]))
        self.wandb_id, self.elapsed = ck.get("wandb_id"), ck.get("elapsed", 0.0)
        for spec, st in zip(self.specs, ck["members"]):
            # only this rank's shard is built: the whole SAE need not fit on one device
            sae: SAE | ShardedTopK = (build_sae(spec.arch, device=self.device) if self.mesh.shards == 1 else
                                      ShardedTopK(spec.arch, self.mesh.shard_index, self.mesh.shards,
                                                  self.mesh.shard_group).to(self.device)).train()
            sae.load_state_dict(st["sae"])
            m = self._member(spec, sae)
            m.opt.load_state_dict(st["opt"])
            m.since_fired.copy_(st["since_fired"])
            m.window_counts.copy_(st["window_counts"])
            self.members.append(m)
        torch.set_rng_state(ck["rng"])
        self._sync_members()
        log.info("resumed %s at step %d (%d tokens)", self.out, self.step, self.step * self.cfg.batch_size)

    def checkpoint(self) -> Path | str:
        """Write the checkpoint: rank 0 (data-parallel ranks hold the same state), or with --shard-latents
        the ranks of the first data group, one file per shard; checkpoint.pt is written last and names
        the step, so a crash between the files leaves the previous complete set in use."""
        if self.mesh.data_index != 0:
            return join(self.out, "checkpoint.pt")
        state = {"version": 1, "config": config_dict(self.cfg), "step": self.step, "position": self.position,
                 "scale": self.scale, "scales": self.scales, "wandb_id": self.wandb_id, "elapsed": self.elapsed,
                 "rng": torch.get_rng_state(), "world": self.dist.world, "shards": self.mesh.shards,
                 "members": [{"name": m.spec.name, "sae": m.sae.state_dict(), "opt": m.opt.state_dict(),
                              "since_fired": m.since_fired.cpu(), "window_counts": m.window_counts.cpu()}
                             for m in self.members]}
        if self.mesh.shards == 1:
            return save_checkpoint(self.out, state)
        s = self.mesh.shard_index
        if s > 0:
            save_shard_checkpoint(self.out, s, self.step, state)
        ddp.barrier(self.mesh.shard_group)  # every shard's file exists before checkpoint.pt names it
        path = save_checkpoint(self.out, state) if s == 0 else join(self.out, "checkpoint.pt")
        ddp.barrier(self.mesh.shard_group)
        if s > 0:
            remove_shard_checkpoints(self.out, s, keep_step=self.step)
        return path

    # ---- the loop --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One step of every member on inputs x (and a transcoder's targets y)."""
        cfg = self.cfg
        var = None
        dw = self.mesh.data_world
        if dw > 1:  # FVU denominators of the global batch, shared out: rank losses sum to the global one
            t = x if y is None else y
            d = t.shape[1] // self.n_out_layers
            var = torch.stack([ddp.global_sq_dev(t[:, j * d:(j + 1) * d], dw, self.mesh.data_group).clamp_min(1e-12)
                               for j in range(self.n_out_layers)]).float() / dw
        for m in self.members:
            sae = m.sae
            dead = m.since_fired >= cfg.dead_after
            sae.normalize_decoder()  # before the forward: y stays as the step left it (see the docstring)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                out = sae(x, dead_mask=dead, target=y, var=var)
            if dw > 1:
                fire, last = self._ddp_backward(m, out)
            else:
                out.loss.backward()
                fire, last = out.fire_counts, None
            sae.project_decoder_grad()
            if cfg.grad_clip > 0 and isinstance(sae, ShardedTopK):
                sae.clip_grad_norm_(cfg.grad_clip)  # the whole SAE's norm over the shards
            elif cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            lr = self.lr(m)
            m.opt.set_lr(lr)
            m.opt.step()
            fired = fire > 0
            m.since_fired += x.shape[0] * dw
            m.since_fired.masked_fill_(fired, 0)  # no host sync (a boolean index would read the count back)
            m.window_counts += fire
            m.last = {"loss": out.loss.detach(), "l0": out.l0, "lr": lr, "dead": dead.float().mean(),
                      **{k: v for k, v in out.terms.items()}} if last is None else {**last, "lr": lr,
                                                                                   "dead": dead.float().mean()}
        self.step += 1
        self.position += x.shape[0] * dw

    def lr(self, m: Member) -> float:
        """This step's lr: warm-up, constant, decay (schedule-free: by default neither warm-up nor decay)."""
        cfg, total = self.cfg, self.cfg.steps
        sf = m.spec.optimizer in SCHEDULE_FREE
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else (0 if sf else 1000)
        decay = cfg.decay_fraction if cfg.decay_fraction is not None else (0.0 if sf else 0.2)
        return lr_at(self.step, total, m.spec.lr, warmup_steps_for(total, warm), decay)

    @property
    def n_out_layers(self) -> int:
        """Hook points the dictionaries reconstruct (a crosscoder's layers; 1 otherwise)."""
        return len(self.cfg.input_hooks) if not self.cfg.target else 1

    def _ddp_backward(self, m: Member, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backward of this rank's share of the global-batch loss, then one all_reduce (sae.distributed).

        The forward divided by var_global/N (per layer): its variance-normalised terms are
        N·Σ_local‖ŷ−y‖²/var_global, whose rank average is the global FVU (and AuxK); mean-over-rows
        terms (L1, L0) average across ranks as they are."""
        sae = m.sae
        out.loss.backward()
        names = sorted(out.terms)
        vals = [out.loss.detach(), out.l0.float()] + [out.terms[k].float() for k in names]
        counts, avg = ddp.reduce_step(list(sae.parameters()), out.fire_counts, torch.stack(vals), self.mesh.data_world,
                                      self.mesh.data_group)
        if isinstance(sae, SAE) and sae.has_threshold:  # batchtopk's EMA threshold: what a global selection's minimum would give
            ddp.all_min_(sae._threshold)
        return counts, {"loss": avg[0], "l0": avg[1], **{k: avg[2 + i] for i, k in enumerate(names)}}

    def run(self) -> TrainResult:
        """Train (or resume) to the end; one run per --out (rank 0 holds OUT.lock throughout)."""
        with exclusive(str(self.cfg.out), "SAE output") if self.dist.is_main else contextlib.nullcontext():
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        else:
            self._init_fresh()
        heldout = self._scaled(torch.from_numpy(heldout_rows(self.store, self.data_hooks, cfg.eval_rows)).to(self.device))
        if not torch.isfinite(heldout).all():
            raise UserError(f"store {cfg.store!r} hook {','.join(self.data_hooks)!r} has NaN/inf activations in "
                            f"held-out rows; recollect it (e.g. with --dtype float32)")
        if not self.dist.is_main:
            heldout = heldout[:0]  # rank 0 evaluates
        elif len(heldout) == 0:
            log.warning("store %s has no held-out rows (collected with --heldout-fraction 0?): held-out metrics "
                        "are skipped; evaluate with `saeforge eval OUT --split all` (rows the SAE trained on)",
                        cfg.store)
        loader = ShuffledLoader(self.store, self.data_hooks, cfg.batch_size, seed=cfg.data_seed, position=self.position,
                                buffer_rows=cfg.buffer_rows, rank=self.mesh.data_index, world=self.mesh.data_world,
                                lanes=cfg.data_lanes, pin_memory=self.device.type == "cuda")
        if self.mesh.data_world > 1 and not loader.local and self.dist.is_main:
            log.warning("--data-lanes %d is not a multiple of the %d data-parallel ranks: every rank reads every "
                        "batch whole and keeps its slice; pass --data-lanes %d so each rank reads only its share",
                        cfg.data_lanes, self.mesh.data_world, self.mesh.data_world)
        self.loader = loader
        logger = RunLogger(cfg.wandb if self.dist.is_main else "disabled", cfg.wandb_project, {**config_dict(cfg), "d_in": self.d_in,
                           "members": [asdict(m.spec) for m in self.members], "input_scale": self.scale,
                           "model": self.store.model_spec, "model_hash": self.store.model_hash},
                           name=str(self.out).rstrip("/").rsplit("/", 1)[-1], run_id=self.wandb_id)
        self.wandb_id = logger.run_id
        handlers = self._install_signals()
        total = cfg.steps
        bar = progress(total=total * cfg.batch_size, desc="train", unit="tok", quiet=cfg.quiet or not self.dist.is_main,
                       initial=self.step * cfg.batch_size)
        next_ckpt = self._next_checkpoint()
        it = iter(loader)
        t_window, tok_window, session_tokens, t_start = time.perf_counter(), 0, 0, time.perf_counter()
        interrupted = False
        try:
            while self.step < total:
                self.train_step(*self._split(self._scaled(next(it).to(self.device, non_blocking=True))))
                tok_window += cfg.batch_size
                session_tokens += cfg.batch_size
                bar.update(cfg.batch_size)
                tokens = self.step * cfg.batch_size
                if self.step % cfg.log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    rate = tok_window / max(now - t_window, 1e-9)
                    t_window, tok_window = now, 0
                    logger.log(self._step_metrics(rate), step=self.step)
                    m0 = self.members[0].last
                    bar.set_postfix(fvu=f"{float(m0['fvu']):.3f}", l0=f"{float(m0['l0']):.1f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total:
                    self._evaluate(logger, heldout)
                if self.on_step is not None:
                    self.on_step(self)
                if next_ckpt and tokens >= next_ckpt and self.step < total:
                    self.checkpoint()
                    next_ckpt = self._next_checkpoint()
                if self.dist.enabled and self.step < total:  # every rank stops at the same step
                    self.stop_requested = ddp.any_rank(self.stop_requested)
                if self.stop_requested and self.step < total:
                    self.elapsed += time.perf_counter() - t_start
                    path = self.checkpoint()
                    log.info("interrupted at %d tokens; checkpoint %s (continue with --resume)", tokens, path)
                    interrupted = True
                    break
        except BaseException:
            self._restore_signals(handlers)
            raise
        finally:
            bar.close()
        self.elapsed += 0.0 if interrupted else time.perf_counter() - t_start
        rate = session_tokens / max(time.perf_counter() - t_start, 1e-9)
        if interrupted:
            self._restore_signals(handlers)
            logger.finish()
            ddp.barrier()  # the checkpoint is written before any rank returns
            return TrainResult([], {}, self.step * cfg.batch_size, True, rate)
        # SIGINT/SIGTERM from here on only skip the (long) full evaluation: the SAEs are always
        # written whole, and the checkpoint goes only once they are
        try:
            final = self._evaluate(logger, heldout, final=True)
            dirs = self._save(final, rate)  # every rank: a sharded SAE is gathered from its shards first
            if self.dist.is_main:
                logger.summary({f"{n}/final/{k}": v for n, d in final.items() for k, v in d.items()})
                if len(heldout) and not self.stop_requested:
                    logger.summary(self._full_eval(dirs))
                if self.stop_requested:
                    log.warning("stop requested after training: the SAEs are saved; the full evaluation was "
                                "skipped (run `saeforge eval DIR` for eval.json)")
                remove_checkpoint(self.out)
                remove_shard_checkpoints(self.out)
            logger.finish()
        finally:
            self._restore_signals(handlers)
        ddp.barrier()  # the SAE directories exist before any rank returns
        return TrainResult(dirs, final if self.dist.is_main else {}, self.step * cfg.batch_size, False, rate)

    def _next_checkpoint(self) -> int:
        every = self.cfg.checkpoint_every
        if every <= 0:
            return 0
        tokens = self.step * self.cfg.batch_size
        return (tokens // every + 1) * every

    def _step_metrics(self, rate: float) -> dict[str, float]:
        out: dict[str, float] = {"tokens": self.step * self.cfg.batch_size, "tokens_per_s": rate}
        for m in self.members:
            for k, v in m.last.items():
                if k == "dead" and isinstance(m.sae, ShardedTopK):  # this rank's latents: the mean over shards
                    v = m.sae.gather_latents(torch.as_tensor(v).reshape(1)).mean()
                out[f"{m.spec.name}/{'dead_fraction' if k == 'dead' else k}"] = float(v)
        return out

    def _latents(self, m: Member, t: torch.Tensor) -> torch.Tensor:
        """A per-latent tensor of the whole SAE (gathered from the shards under --shard-latents)."""
        return m.sae.gather_latents(t) if isinstance(m.sae, ShardedTopK) else t

    @contextlib.contextmanager
    def inference(self, m: Member) -> Iterator[SAE | None]:
        """The whole SAE with the weights the optimizer means for inference; a sharded one is gathered
        on the ranks of the first data group (a collective there) and None elsewhere. Adam's are the
        parameters with unit-norm decoder rows (renormalising in place is what the next step does
        first anyway); a schedule-free optimizer's are its average x."""
        if not m.opt.schedule_free:
            m.sae.normalize_decoder()
        with m.opt.inference_weights():
            if not isinstance(m.sae, ShardedTopK):
                yield m.sae
            else:
                yield m.sae.to_sae() if self.mesh.data_index == 0 else None

    def _evaluate(self, logger: RunLogger, heldout: torch.Tensor, final: bool = False) -> dict[str, dict[str, float]]:
        res: dict[str, dict[str, float]] = {}
        for m in self.members:
            d: dict[str, float] = {}
            with self.inference(m) as sae:
                if len(heldout) and sae is not None:
                    # heldout is in the SAE's (scaled) units; evaluate_rows takes raw rows + the scales
                    n_in = len(self.cfg.input_hooks)
                    x, y = self._split(heldout / self._scale_columns(heldout))
                    r = evaluate_rows(sae, x, input_scale=self.scales[:n_in], target=y,
                                      output_scale=self.scales[n_in:] or None)
                    d.update({f"heldout_{k}": v for k, v in flat_metrics(r).items()})
            d["train_fvu"] = float(m.last.get("fvu", math.nan))
            d["train_l0"] = float(m.last.get("l0", math.nan))
            d["dead_fraction"] = float(self._latents(m, (m.since_fired >= self.cfg.dead_after).float()).mean())
            res[m.spec.name] = d
            logger.log({f"{m.spec.name}/{k}": v for k, v in d.items()}, step=self.step)
            window_tokens = max(int(self.cfg.eval_every) * self.cfg.batch_size, 1)
            density = (self._latents(m, m.window_counts).double().cpu().numpy() / window_tokens)
            logger.histogram(f"{m.spec.name}/log10_latent_density", np.log10(density + 1e-10), step=self.step)
            m.window_counts.zero_()
        return res

    def _full_eval(self, dirs: list[Path | str]) -> dict[str, float]:
        """`saeforge eval` on each saved SAE (eval.json beside it); scalars as {name}/eval/{k}."""
        from sae.eval_run import EvalConfig, run_eval
        cfg = self.cfg
        out: dict[str, float] = {}
        for m, d in zip(self.members, dirs):
            if self.stop_requested:
                break
            res, _ = run_eval(EvalConfig(sae=str(d), store=str(cfg.store), tokens=cfg.eval_rows,
                                         ce_tokens=cfg.eval_ce_tokens, device=cfg.device, wandb="disabled",
                                         quiet=cfg.quiet))
            out.update({f"{m.spec.name}/eval/{k}": v for k, v in res["metrics"].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return out

    def _save(self, final: dict[str, dict[str, float]], rate: float) -> list[Path | str]:
        """Rank 0 writes each SAE directory (the others return []; under --shard-latents they take part in
        gathering the SAE first)."""
        dirs: list[Path | str] = []
        many = len(self.members) > 1
        for m in self.members:
            with self.inference(m) as sae:
                if self.dist.is_main and sae is not None:
                    dirs.append(self._save_one(m, sae, final, rate, many))
        return dirs

    def _save_one(self, m: Member, sae: SAE, final: dict[str, dict[str, float]], rate: float,
                  many: bool) -> Path | str:
        """One SAE directory with its metadata (weights already the inference ones)."""
        d = join(self.out, m.spec.name) if many else self.out
        ins = self.cfg.input_hooks
        points: dict[str, Any] = {"hook_point": ins[0] if len(ins) == 1 else None, "hook_points": ins,
                                  "output_hook_points": [self.cfg.target] if self.cfg.target else ins}
        if self.cfg.target:
            points["target_hook_point"] = self.cfg.target
        store_keys = ("model", "model_hash", "model_class", "tokenizer", "context", "corpus", "d_model", "dtype",
                      "prepend_bos", "hook_modules", "hook_outputs")
        meta = {**points, "model": self.store.model_spec, "model_hash": self.store.model_hash,
                "store": str(self.cfg.store), "training_tokens": self.step * self.cfg.batch_size,
                "lr": m.spec.lr, "optimizer": m.spec.optimizer, "seed": m.spec.seed,
                "final_metrics": {**final[m.spec.name], "tokens_per_s": rate},
                "config": config_dict(self.cfg), "wandb_run_id": self.wandb_id,
                "wandb_project": self.cfg.wandb_project, "wandb_dir": os.getcwd(),
                "store_attrs": {k: self.store.attrs.get(k) for k in store_keys}}
        n_in = len(ins)
        path = save_sae(sae, d, scale=self.scale, meta=meta,
                        scales=(self.scales[:n_in], self.scales[n_in:] or self.scales[:n_in]))
        log.info("saved %s (held-out FVU %.4f)", d, final[m.spec.name].get("heldout_fvu", math.nan))
        return path

    # ---- signals --------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Finish the current step, checkpoint, and return (SIGINT/SIGTERM handler)."""
        self.stop_requested = True

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, Any] = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, self.request_stop)
        return old

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for s, h in old.items():
            signal.signal(s, h)


def flat_metrics(r: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics of an evaluation for logging: per-layer and per-prefix lists become one key each
    (layer{i}_fvu for a crosscoder's hook points in order, prefix{n}_fvu for a Matryoshka prefix of n latents)."""
    out = {k: v for k, v in r.items() if k not in ("latent_density_hist", "d_sae", "layer_fvu", "prefix_fvu",
                                                   "prefix_sizes")}
    out.update({f"layer{i}_fvu": v for i, v in enumerate(r.get("layer_fvu") or [])})
    out.update({f"prefix{n}_fvu": v for n, v in zip(r.get("prefix_sizes") or [], r.get("prefix_fvu") or [])})
    return out


def train(cfg: TrainConfig, **kw: Any) -> TrainResult:
    """Library entry point: `train(TrainConfig(store=..., hook=..., out=...))`."""
    return Trainer(cfg, **kw).run()

"""The collector: corpus → hooked model (stopped after the deepest hook) → Zarr store.

The forward pass fills a pre-allocated shard buffer; a background thread writes full shards
so the model never waits on disk. Rows already committed are skipped on resume, so a killed
run continues with nothing lost and nothing written twice.

Under torchrun (WORLD_SIZE > 1) every rank collects its own slice of the packed sequences
(index % world_size == rank) into its own part of the store (see collect/store.py); rank 0
writes the shared root attributes, the keep-mask calibration (measured on the first global batch,
so keep does not depend on the rank count) and, once every part is complete, the total.
"""
from __future__ import annotations

import contextlib
import logging
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

import saeforge
from saeforge.config import check_choices, config_dict, option
from saeforge.devices import check_device, torch_device
from collect.distributed import DistContext, init_from_env, rank_share, resolve_device, token_share
from collect.corpus import TokenShare, describe_corpus, estimate_tokens, load_documents, pack_sequences
from saeforge.errors import UserError
from collect.backends import BackendName, Backend, open_backend
from collect.model import LoadedModel, ModelDtype
from saeforge.progress import progress
from saeforge.locks import exclusive
from saeforge.urls import check_output_dir, join
from collect.store import (StorageDtype, PartsRoot, ShardPlan, Store, StoreWriter, free_bytes,
                           part_name, storage_np_dtype)

log = logging.getLogger(__name__)

META_BYTES_PER_ROW = 4 + 8 + 4 + 1 + 1  # tokens, seq, pos, keep, heldout


@dataclass
class CollectConfig:
    """Everything that defines a collection run (saved in the store's attributes)."""
    model: str = option("smollm2-135m", "smollm2-135m, an HF dir, a .gguf path or a hub name")
    corpus: str = option("python-docs", "python-docs, a file, folder, glob or hub name")
    text_field: str = option("text", "column holding the text in json/parquet/csv")
    hooks: list[str] = option(["layers.15.resid_post"], "comma-separated hook points")
    context: int = option(128, "tokens per packed sequence")
    max_tokens: int | None = option(None, "stop after this many tokens (default: whole corpus)")
    batch_size: int = option(8, "sequences per forward pass")
    dtype: StorageDtype = option("float16", "storage dtype (bfloat16 is stored as a uint16 view)")
    model_dtype: ModelDtype = option("float32", "compute dtype of the model")
    device: str = option("cpu", "cpu, cuda, cuda:1, …")
    backend: BackendName = option("torch", "torch (transformers) or llama.cpp (a GGUF model run quantised by "
                                           "llama.cpp; pip install 'saeforge[llama]')")
    out: str = option("runs/quickstart/store.zarr", "store path or fsspec URL")
    heldout_fraction: float = option(0.05, "share of documents held out")
    prepend_bos: bool = option(True, "start every sequence with BOS")
    outlier_norm: float = option(10.0, "keep=false when norm > this × median norm")
    shard_rows: int | None = option(None, "rows per shard (multiple of context; default ≈32 MiB)")
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        check_choices(self)
        if self.context < 2:
            raise UserError(f"--context {self.context} is too small; use at least 2 (e.g. 128)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise UserError(f"--max-tokens {self.max_tokens} is less than one sequence of --context {self.context}")
        if not 0 <= self.heldout_fraction < 1:
            raise UserError(f"--heldout-fraction {self.heldout_fraction} must be in [0, 1)")
        if self.outlier_norm <= 1:
            raise UserError(f"--outlier-norm {self.outlier_norm} must be > 1 (default 10)")
        check_device(self.device)


def _batches(seqs: Iterator[Any], batch_size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for s in seqs:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriterThread:
    """Writes full shard buffers in the background; hands each buffer back when written."""

    def __init__(self, writer: StoreWriter, buffers: list[dict[str, np.ndarray]]):
        self.writer = writer
        self.free: queue.Queue[dict[str, np.ndarray]] = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.todo: queue.Queue[tuple[int, int, dict[str, np.ndarray]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saeforge-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            start, n, buf = item
            try:
                if self.error is None:
                    self.writer.write(start, {k: v[:n] for k, v in buf.items()})
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
            self.free.put(buf)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def take_buffer(self) -> dict[str, np.ndarray]:
        self._raise()
        buf = self.free.get()
        self._raise()
        return buf

    def submit(self, start: int, n: int, buf: dict[str, np.ndarray]) -> None:
        self._raise()
        self.todo.put((start, n, buf))

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()
        self._raise()


def _special_mask(tokens: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    if not special_ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(special_ids, dtype=tokens.dtype))


def _median_norms(acts: dict[str, torch.Tensor], special: torch.Tensor) -> dict[str, float]:
    ok = ~special.reshape(-1)
    return {h: float(a.reshape(-1, a.shape[-1])[ok].float().norm(dim=-1).median()) for h, a in acts.items()}


def collect_activations(cfg: CollectConfig, loaded: LoadedModel | None = None) -> Store:
    """Run (or resume) a collection; returns the store opened for reading (finished, except on
    ranks > 0 of a multi-rank run, which return as soon as their own part is complete)."""
    check_output_dir(cfg.out)
    if cfg.backend == "torch":
        torch_device(cfg.device)  # --device cuda without CUDA: one line before the lock file or any model load
    ctx = init_from_env(cfg.device)
    try:
        # one run per store: a second `collect` on the same --out stops here (rank 0 holds the lock)
        with exclusive(cfg.out, "store") if ctx.is_main else contextlib.nullcontext():
            return _collect(cfg, loaded, ctx)
    finally:
        ctx.close()


@dataclass
class _Run:
    """What every part of a run shares: the model, hook points, corpus and layout."""
    cfg: CollectConfig
    backend: Backend
    names: list[str]
    d_model: int
    docs: Any
    special_ids: list[int]
    row_bytes: int
    plan: ShardPlan

    def forward(self, batch: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        ids = np.stack([s.tokens for s in batch])
        acts, seconds = self.backend.forward(ids)
        return torch.from_numpy(ids.astype(np.int64)), acts, seconds

    def sequences(self, rank: int = 0, world_size: int = 1, start: int = 0, stop: int | None = None,
                  share: TokenShare | None = None) -> Iterator[Any]:
        return pack_sequences(self.docs, self.backend.tokenizer, self.cfg.context, prepend_bos=self.cfg.prepend_bos,
                              heldout_fraction=self.cfg.heldout_fraction, rank=rank, world_size=world_size,
                              start=start, stop=stop, share=share)

    def calibrate(self, ids: torch.Tensor, acts: dict[str, torch.Tensor]) -> dict[str, float]:
        return _median_norms(acts, _special_mask(ids, self.special_ids))


def _collect(cfg: CollectConfig, loaded: LoadedModel | None, ctx: DistContext) -> Store:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device, ctx.local_rank, ctx.world_size)
    backend = open_backend(cfg.backend, cfg.model, cfg.hooks, device, cfg.model_dtype, loaded)
    tok, names, d_model = backend.tokenizer, backend.names, backend.d_model
    if backend.max_positions is not None and cfg.context > backend.max_positions:
        raise UserError(f"--context {cfg.context} is longer than {cfg.model!r} can attend over "
                        f"({backend.max_positions} positions); use --context {backend.max_positions} or less")
    docs = load_documents(cfg.corpus, cfg.text_field)
    special_ids = sorted(set(getattr(tok, "all_special_ids", []) or []))
    row_bytes = d_model * np.dtype(storage_np_dtype(cfg.dtype)).itemsize * len(names) + META_BYTES_PER_ROW
    plan = ShardPlan.for_rows(cfg.context, row_bytes, cfg.shard_rows)
    run = _Run(cfg, backend, names, d_model, docs, special_ids, row_bytes, plan)
    attrs = {
        "model": cfg.model, **backend.attrs(), "hook_points": names,
        "d_model": d_model, "dtype": cfg.dtype, "context": cfg.context,
        "corpus": describe_corpus(cfg.corpus, cfg.text_field), "heldout_fraction": cfg.heldout_fraction,
        "prepend_bos": cfg.prepend_bos, "outlier_norm": cfg.outlier_norm, "rank": 0, "world_size": ctx.world_size,
        "saeforge_version": saeforge.__version__, "config": config_dict(cfg),
    }
    corpus_tokens = estimate_tokens(docs, tok)
    target = min(cfg.max_tokens or corpus_tokens, corpus_tokens)
    target_rows = (target // cfg.context) * cfg.context if cfg.max_tokens else None
    if ctx.active:
        return _collect_ranks(run, attrs, ctx, target, target_rows, t_start)

    writer = StoreWriter(cfg.out, attrs, plan)
    if writer.complete:
        if not _wants_more(writer.attrs, writer.n_committed, target_rows):
            log.info("store %s is already complete (%s tokens); nothing to do", cfg.out, f"{writer.n_committed:,}")
            return Store.open(cfg.out)
        log.info("store %s is complete at %s tokens; extending it to %s", cfg.out, f"{writer.n_committed:,}",
                 "the whole corpus" if target_rows is None else f"{target_rows:,} tokens")
        writer.reopen()
    start_row = writer.n_committed
    seqs = run.sequences(start=start_row // cfg.context)
    medians = dict(writer.attrs["norm_median"]) if "norm_median" in writer.attrs else None
    loop = _fill(run, writer, seqs, target, target_rows, medians, quiet=cfg.quiet)
    if loop is None and start_row == 0:
        raise UserError(f"corpus {cfg.corpus!r} is shorter than one sequence of --context {cfg.context}; "
                        f"use a larger corpus or a smaller --context")
    writer.finish(corpus_exhausted=target_rows is None or writer.n_committed < target_rows)
    elapsed = time.perf_counter() - t_start
    if loop is not None:
        writer.update_attrs(collect_seconds=round(elapsed, 2), loop_seconds=round(loop, 3),
                            loop_tokens=writer.n_committed - start_row)
    log.info("store %s complete: %s tokens in %.1f s", cfg.out, f"{writer.n_committed:,}", elapsed)
    return Store.open(cfg.out)


def _collect_ranks(run: _Run, attrs: dict[str, Any], ctx: DistContext, target: int, target_rows: int | None,
                   t_start: float) -> Store:
    """One rank of a multi-rank run: rank 0 sets up the root, every rank fills its own part."""
    cfg = run.cfg
    root: PartsRoot | None = None
    info: dict[str, Any] | None = None
    if ctx.is_main:
        try:
            root = PartsRoot(cfg.out, {k: v for k, v in attrs.items() if k != "rank"}, run.plan, ctx.world_size)
            if not root.complete and "norm_median" not in root.attrs:
                # the first global batch, as a single process would see it: keep is rank-count independent
                calib = list(itertools.islice(run.sequences(), cfg.batch_size))
                if not calib:
                    raise UserError(f"corpus {cfg.corpus!r} is shorter than one sequence of --context {cfg.context}; "
                                    f"use a larger corpus or a smaller --context")
                ids, acts, _ = run.forward(calib)
                root.update_attrs(norm_median=run.calibrate(ids, acts))
            info = {"complete": root.complete, "norm_median": root.attrs["norm_median"] if not root.complete else None}
        except Exception as e:
            ctx.broadcast({"error": str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}"})
            raise
    info = ctx.broadcast(info)
    if "error" in info:
        raise UserError(info["error"])
    if info["complete"]:
        done = Store.open(cfg.out)
        if _wants_more(done.attrs, done.n_tokens, target_rows):
            raise UserError(f"store {cfg.out!r} is complete with {done.n_tokens:,} tokens and this run asks for more; "
                            f"a multi-rank store cannot be extended: collect into a new --out")
        log.info("store %s is already complete; nothing to do", cfg.out)
        return done

    medians = dict(info["norm_median"])
    part = join(cfg.out, part_name(ctx.rank))
    writer = StoreWriter(part, {**attrs, "rank": ctx.rank, "norm_median": medians}, run.plan)
    # every rank tokenises only its share of the document batches and walks all of them (drained
    # below, also by a rank whose part is already complete) up to the same global last sequence
    tok_share = token_share(ctx)
    stop = None if target_rows is None else target_rows // cfg.context
    start_row = writer.n_committed
    # this rank's k-th sequence has global index rank + k·world_size
    seqs = run.sequences(ctx.rank, ctx.world_size, start=(start_row // cfg.context) * ctx.world_size, stop=stop,
                         share=tok_share)
    if not writer.complete:
        share_rows = None if target_rows is None else \
            rank_share(target_rows // cfg.context, ctx.rank, ctx.world_size) * cfg.context
        share = share_rows if share_rows is not None else -(-target // ctx.world_size)
        loop = _fill(run, writer, seqs, share, share_rows, medians, quiet=cfg.quiet or not ctx.is_main,
                     disk_sharers=ctx.local_world_size, label=f"rank {ctx.rank}: ")
        writer.finish()
        if loop is not None:
            writer.update_attrs(collect_seconds=round(time.perf_counter() - t_start, 2), loop_seconds=round(loop, 3),
                                loop_tokens=writer.n_committed - start_row)
        log.info("rank %d: part %s complete: %s tokens", ctx.rank, part, f"{writer.n_committed:,}")
    for _ in seqs:  # the rounds the other ranks still need this rank's tokenisation for
        pass
    if tok_share is not None:
        log.info("rank %d tokenised %d of %d documents (%d characters)", ctx.rank, tok_share.docs_tokenized,
                 tok_share.docs_seen, tok_share.chars_tokenized)
    if root is not None:
        status = _wait_for_parts(root)
        root.finish(n_tokens=sum(n for n, _ in status), collect_seconds=round(time.perf_counter() - t_start, 2))
        log.info("store %s complete: %s tokens from %d ranks in %.1f s", cfg.out, f"{root.attrs['n_tokens']:,}",
                 ctx.world_size, time.perf_counter() - t_start)
    return Store.open(cfg.out)


def _wants_more(attrs: dict[str, Any], n_committed: int, target_rows: int | None) -> bool:
    """Whether a complete store should grow for this run's --max-tokens (None = the whole corpus).

    A store that ran out of corpus has nothing more to give; one stopped by a smaller --max-tokens
    grows when asked for more."""
    exhausted = attrs.get("corpus_exhausted")
    if exhausted is None:  # stores from before this attribute: stopped by max_tokens iff one was set
        old_max = (attrs.get("config") or {}).get("max_tokens")
        context = int(attrs.get("context", 1))
        exhausted = old_max is None or n_committed < (old_max // context) * context
    if exhausted:
        return False
    return target_rows is None or target_rows > n_committed


def _wait_for_parts(root: PartsRoot, poll_seconds: float = 1.0) -> list[tuple[int, bool]]:
    """Rank 0 waits until every part says complete. Polling the parts' own attributes rather than a
    collective barrier: a rank that resumes with little left never hits a collective timeout, and
    torchrun already tears the group down if a rank dies."""
    said = 0.0
    while True:
        status = root.part_status()
        waiting = [r for r, (_, done) in enumerate(status) if not done]
        if not waiting:
            return status
        if time.monotonic() - said > 60:
            log.info("rank 0: waiting for rank(s) %s to finish their parts", waiting)
            said = time.monotonic()
        time.sleep(poll_seconds)


def _fill(run: _Run, writer: StoreWriter, seqs: Iterator[Any], target: int, target_rows: int | None,
          medians: dict[str, float] | None, quiet: bool, disk_sharers: int = 1, label: str = "") -> float | None:
    """Forward `seqs` and commit their rows to `writer` (up to target_rows); the loop's seconds, or
    None when `seqs` was empty. Measures norm medians on the first batch when `medians` is None."""
    cfg, plan, names, d_model = run.cfg, run.plan, run.names, run.d_model
    special_ids, row_bytes = run.special_ids, run.row_bytes
    start_row = writer.n_committed
    batches = _batches(seqs, cfg.batch_size)
    first = next(batches, None)
    if first is None:
        return None

    ids0, acts0, dt0 = run.forward(first)
    if medians is None:
        medians = run.calibrate(ids0, acts0)
        writer.update_attrs(norm_median=medians)
    rate = ids0.numel() / max(dt0, 1e-9)
    remaining = max(0, target - start_row)
    need = remaining * row_bytes
    log.info("%scollecting ~%s tokens (%.2f GB at %s) into %s; first batch ran at %.0f tokens/s, estimated %.1f min",
             label, f"{remaining:,}", need / 1e9, cfg.dtype, writer.path, rate, remaining / rate / 60)
    free = free_bytes(writer.path)
    if free is not None and need * disk_sharers * 1.05 > free:
        raise UserError(f"not enough disk for {cfg.out!r}: need ~{need * disk_sharers / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB free; lower --max-tokens, use --dtype float16, or choose another --out")

    buffers = [{**{h: np.empty((plan.shard_rows, d_model), dtype=storage_np_dtype(cfg.dtype)) for h in names},
                "tokens": np.empty(plan.shard_rows, np.int32), "seq": np.empty(plan.shard_rows, np.int64),
                "pos": np.empty(plan.shard_rows, np.int32), "keep": np.empty(plan.shard_rows, bool),
                "heldout": np.empty(plan.shard_rows, bool)} for _ in range(2)]
    bg = _ShardWriterThread(writer, buffers)
    bar = progress(total=(target_rows or target), initial=start_row, desc=f"{label}collect", unit="tok", quiet=quiet)
    row, shard_start, fill = start_row, start_row, 0
    buf = bg.take_buffer()
    pos_row = np.arange(cfg.context, dtype=np.int32)
    pending: tuple | None = (first, ids0, acts0)
    t_loop = time.perf_counter() - dt0  # the first batch's forward counts as loop time
    try:
        while pending is not None or (target_rows is None or row < target_rows):
            if pending is None:
                batch = next(batches, None)
                if batch is None:
                    break
                ids, acts, _ = run.forward(batch)
            else:
                batch, ids, acts = pending
                pending = None
            if target_rows is not None:
                batch = batch[: (target_rows - row) // cfg.context]
                if not batch:
                    break
            n_seq = len(batch)
            special = _special_mask(ids[:n_seq], special_ids).reshape(-1)
            keep = ~special
            for h in names:
                a = acts[h][:n_seq].reshape(-1, d_model)
                if not torch.isfinite(a).all():
                    raise UserError(f"NaN or inf in activations at {h} (sequences from {batch[0].index}); "
                                    f"try --model-dtype float32")
                keep &= a.norm(dim=-1) <= cfg.outlier_norm * medians[h]
            done = 0
            while done < n_seq:  # a batch may straddle a shard boundary
                take = min(n_seq - done, (plan.shard_rows - fill) // cfg.context)
                r0, r1 = done * cfg.context, (done + take) * cfg.context
                sl = slice(fill, fill + (r1 - r0))
                for h in names:
                    src = acts[h][done:done + take].reshape(-1, d_model)
                    if cfg.dtype == "bfloat16":
                        buf[h][sl] = src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                    else:
                        torch.from_numpy(buf[h][sl]).copy_(src)
                buf["tokens"][sl] = ids[done:done + take].reshape(-1).numpy()
                buf["seq"][sl] = np.repeat(np.array([s.index for s in batch[done:done + take]], np.int64), cfg.context)
                buf["pos"][sl] = np.tile(pos_row, take)
                buf["keep"][sl] = keep[r0:r1].numpy()
                buf["heldout"][sl] = np.repeat(np.array([s.heldout for s in batch[done:done + take]]), cfg.context)
                fill += r1 - r0
                done += take
                if fill == plan.shard_rows:
                    bg.submit(shard_start, fill, buf)
                    shard_start += fill
                    fill = 0
                    buf = bg.take_buffer()
            row += n_seq * cfg.context
            bar.update(n_seq * cfg.context)
        if fill:
            bg.submit(shard_start, fill, buf)
        bg.close()
    except BaseException:
        bar.close()
        bg.close() if bg.error is None else None
        raise
    bar.close()
    return time.perf_counter() - t_loop

"""The collector: corpus → hooked model (stopped after the deepest hook) → Zarr store.

The forward pass fills a pre-allocated shard buffer; a background thread writes full shards
so the model never waits on disk. Rows already committed are skipped on resume, so a killed
run continues with nothing lost and nothing written twice.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

import collect
from collect.config import config_dict
from collect.corpus import describe_corpus, estimate_tokens, load_documents, pack_sequences
from collect.errors import UserError
from collect.hooks import forward_to
from collect.layers import discover_layout, parse_hook_points
from collect.model import LoadedModel, load_model
from collect.progress import progress
from collect.store import STORAGE_DTYPES, ShardPlan, Store, StoreWriter, free_bytes, storage_np_dtype

log = logging.getLogger(__name__)

META_BYTES_PER_ROW = 4 + 8 + 4 + 1 + 1  # tokens, seq, pos, keep, heldout


@dataclass
class CollectConfig:
    """Everything that defines a collection run (saved in the store's attributes)."""
    model: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, an HF dir, a .gguf path or a hub name"})
    corpus: str = field(default="python-docs", metadata={"help": "python-docs, a file, folder, glob or hub name"})
    text_field: str = field(default="text", metadata={"help": "column holding the text in json/parquet/csv"})
    hooks: list[str] = field(default_factory=lambda: ["layers.15.resid_post"], metadata={"help": "comma-separated hook points"})
    context: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many tokens (default: whole corpus)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16, float32 or bfloat16"})
    model_dtype: str = field(default="float32", metadata={"help": "compute dtype of the model"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, …"})
    out: str = field(default="runs/quickstart/store.zarr", metadata={"help": "store path or fsspec URL"})
    heldout_fraction: float = field(default=0.05, metadata={"help": "share of documents held out"})
    prepend_bos: bool = field(default=True, metadata={"help": "start every sequence with BOS"})
    outlier_norm: float = field(default=10.0, metadata={"help": "keep=false when norm > this × median norm"})
    shard_rows: int | None = field(default=None, metadata={"help": "rows per shard (multiple of context; default ≈32 MiB)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def validate(self) -> None:
        if self.context < 2:
            raise UserError(f"--context {self.context} is too small; use at least 2 (e.g. 128)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise UserError(f"--max-tokens {self.max_tokens} is less than one sequence of --context {self.context}")
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not a storage dtype; use one of {list(STORAGE_DTYPES)}")
        if not 0 <= self.heldout_fraction < 1:
            raise UserError(f"--heldout-fraction {self.heldout_fraction} must be in [0, 1)")
        if self.outlier_norm <= 1:
            raise UserError(f"--outlier-norm {self.outlier_norm} must be > 1 (default 10)")


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
    """Run (or resume) a collection; returns the finished store opened for reading."""
    t_start = time.perf_counter()
    loaded = loaded or load_model(cfg.model, cfg.device, cfg.model_dtype)
    model, tok = loaded.model, loaded.tokenizer
    layout = discover_layout(model)
    points = parse_hook_points(layout, cfg.hooks)
    names = [p.name for p in points]
    d_model = int(model.get_input_embeddings().weight.shape[1])
    docs = load_documents(cfg.corpus, cfg.text_field)
    special_ids = sorted(set(getattr(tok, "all_special_ids", []) or []))
    row_bytes = d_model * np.dtype(storage_np_dtype(cfg.dtype)).itemsize * len(names) + META_BYTES_PER_ROW
    plan = ShardPlan.for_rows(cfg.context, row_bytes, cfg.shard_rows)
    attrs = {
        "model": cfg.model, "model_hash": loaded.weights_hash, "model_class": type(model).__name__,
        "tokenizer": getattr(tok, "name_or_path", "") or cfg.model,
        "hook_points": names, "hook_modules": {p.name: p.module for p in points},
        "d_model": d_model, "n_layers": layout.n_layers, "dtype": cfg.dtype, "context": cfg.context,
        "corpus": describe_corpus(cfg.corpus, cfg.text_field), "heldout_fraction": cfg.heldout_fraction,
        "prepend_bos": cfg.prepend_bos, "rank": 0, "world_size": 1,
        "saeforge_version": collect.__version__, "config": config_dict(cfg),
    }
    writer = StoreWriter(cfg.out, attrs, plan)
    if writer.complete:
        log.info("store %s is already complete (%d tokens); nothing to do", cfg.out, writer.n_committed)
        return Store.open(cfg.out)
    start_row = writer.n_committed
    start_seq = start_row // cfg.context
    corpus_tokens = estimate_tokens(docs, tok)
    target = min(cfg.max_tokens or corpus_tokens, corpus_tokens)
    target_rows = (target // cfg.context) * cfg.context if cfg.max_tokens else None

    seqs = pack_sequences(docs, tok, cfg.context, prepend_bos=cfg.prepend_bos,
                          heldout_fraction=cfg.heldout_fraction, start=start_seq)
    batches = _batches(seqs, cfg.batch_size)
    first = next(batches, None)
    if first is None:
        if start_row == 0:
            raise UserError(f"corpus {cfg.corpus!r} is shorter than one sequence of --context {cfg.context}; "
                            f"use a larger corpus or a smaller --context")
        writer.finish()
        return Store.open(cfg.out)

    def run(batch: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        ids = torch.from_numpy(np.stack([s.tokens for s in batch]).astype(np.int64)).to(loaded.device)
        t0 = time.perf_counter()
        acts = forward_to(model, ids, names, layout=layout)
        return ids.cpu(), {h: acts[h].float().cpu() for h in names}, time.perf_counter() - t0

    ids0, acts0, dt0 = run(first)
    if "norm_median" in writer.attrs:
        medians = dict(writer.attrs["norm_median"])
    else:
        medians = _median_norms(acts0, _special_mask(ids0, special_ids))
        writer.update_attrs(norm_median=medians)
    rate = ids0.numel() / max(dt0, 1e-9)
    remaining = max(0, target - start_row)
    need = remaining * row_bytes
    log.info("collecting ~%s tokens (%.2f GB at %s) into %s; first batch ran at %.0f tokens/s, estimated %.1f min",
             f"{remaining:,}", need / 1e9, cfg.dtype, cfg.out, rate, remaining / rate / 60)
    free = free_bytes(cfg.out)
    if free is not None and need * 1.05 > free:
        raise UserError(f"not enough disk for {cfg.out!r}: need ~{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
                        f"lower --max-tokens, use --dtype float16, or choose another --out")

    buffers = [{**{h: np.empty((plan.shard_rows, d_model), dtype=storage_np_dtype(cfg.dtype)) for h in names},
                "tokens": np.empty(plan.shard_rows, np.int32), "seq": np.empty(plan.shard_rows, np.int64),
                "pos": np.empty(plan.shard_rows, np.int32), "keep": np.empty(plan.shard_rows, bool),
                "heldout": np.empty(plan.shard_rows, bool)} for _ in range(2)]
    bg = _ShardWriterThread(writer, buffers)
    bar = progress(total=(target_rows or target), initial=start_row, desc="collect", unit="tok", quiet=cfg.quiet)
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
                ids, acts, _ = run(batch)
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
    writer.finish()
    elapsed = time.perf_counter() - t_start
    writer.update_attrs(collect_seconds=round(elapsed, 2), loop_seconds=round(time.perf_counter() - t_loop, 3),
                        loop_tokens=writer.n_committed - start_row)
    log.info("store %s complete: %s tokens in %.1f s", cfg.out, f"{writer.n_committed:,}", elapsed)
    return Store.open(cfg.out)

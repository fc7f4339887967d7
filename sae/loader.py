"""Shuffled training batches from an activation store, as a pure function of (seed, position).

Zarr is fast only for whole chunks, so shuffling happens in RAM: each epoch visits the store's
chunks in a seeded random order, groups of chunks fill a mixing buffer (`buffer_rows`), and the
training rows of a group (keep & ~heldout) are emitted in a seeded random permutation. The
stream of rows is fixed by the seed alone, so a batch is identified by its row position and a
resumed run sees exactly the batches an uninterrupted run would. A prefetch thread fills the next
buffer while the current one is consumed.

Rows of several hook points of the same tokens (a transcoder's input and target, a crosscoder's
layers) come side by side, [batch, H·d] in the order given: one row position names one token in
every hook, so the stream is the same as for one hook.

Data parallel (rank r of N): every rank walks the same stream of global batches of `batch_size`
rows and yields only rows [r·B/N, (r+1)·B/N) of each, so the N slices together are exactly the
single-process batch. (Each rank reads whole chunks of every group, as shuffling needs them.)
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from saeforge.errors import UserError
from collect.store import Split, Store

log = logging.getLogger(__name__)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(key)))


@dataclass
class _Group:
    epoch: int
    index: int
    chunks: list[tuple[int, int]]
    n_rows: int


def hook_list(hook: str | Sequence[str]) -> list[str]:
    return [hook] if isinstance(hook, str) else list(hook)


def check_hooks(store: Store, hooks: Sequence[str]) -> None:
    for h in hooks:
        if h not in store.hooks:
            raise UserError(f"hook point {h!r} is not in store {store.path!r}; it holds {store.hooks}; "
                            f"pass one of them (or collect {h} with `saeforge collect --hooks …`)")


def check_widths(store: Store, hooks: Sequence[str], what: str) -> int:
    """The one width d of `hooks` in `store`, refusing hooks of different widths (one line)."""
    widths = {h: int(store.raw_activations(h, 0, 0).shape[1]) for h in hooks}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{h} (d={w})" for h, w in widths.items())
        raise UserError(f"{what} needs hook points of one width, but store {store.path!r} has {listed}; choose hook "
                        f"points of the same width")
    return next(iter(widths.values()))


def read_rows(store: Store, hooks: Sequence[str], a: int, b: int) -> np.ndarray:
    """float32 [b − a, H·d]: rows [a, b) of every hook side by side."""
    if len(hooks) == 1:
        return store.activations(hooks[0], a, b)
    return np.concatenate([store.activations(h, a, b) for h in hooks], axis=1)


class ShuffledLoader:
    """Infinite iterator of float32 [batch_size / world, H·d] training batches (this rank's slice of
    each global batch; H hook points side by side) starting at global row `position`."""

    def __init__(self, store: Store, hook: str | Sequence[str], batch_size: int, seed: int = 0, position: int = 0,
                 buffer_rows: int = 1 << 17, split: Split = "train", check_finite: bool = True,
                 rank: int = 0, world: int = 1):
        self.hooks = hook_list(hook)
        check_hooks(store, self.hooks)
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the number of ranks ({world}) "
                            f"so every rank gets an equal slice of each global batch")
        self.store, self.hook, self.batch_size, self.seed = store, ",".join(self.hooks), batch_size, seed
        self.rank, self.world = rank, world
        self.position = position
        self.check_finite = check_finite
        self.mask = store.split_mask(split)  # bool [n_tokens], small next to the activations
        self.chunks = store.chunk_ranges()
        self.counts = np.array([int(self.mask[a:b].sum()) for a, b in self.chunks], dtype=np.int64)
        self.n_rows = int(self.counts.sum())
        if self.n_rows < batch_size:
            raise UserError(f"store {store.path!r} has {self.n_rows} {split} rows for hook {self.hook!r}, fewer than one "
                            f"batch (--batch-size {batch_size}); collect more tokens or lower --batch-size")
        self.chunks_per_group = max(1, buffer_rows // max(store.chunk_rows, 1))

    # ---- the deterministic row stream ----------------------------------------------------
    def _epoch_groups(self, epoch: int) -> list[_Group]:
        order = _rng(self.seed, epoch).permutation(len(self.chunks))
        groups = []
        for gi, s in enumerate(range(0, len(order), self.chunks_per_group)):
            idx = order[s:s + self.chunks_per_group]
            groups.append(_Group(epoch, gi, [self.chunks[i] for i in idx], int(self.counts[idx].sum())))
        return groups

    def _groups_from(self, row: int) -> Iterator[tuple[_Group, int]]:
        """Groups of the stream from the one holding `row`, with the offset of `row` in the first."""
        epoch = row // self.n_rows
        rem = row - epoch * self.n_rows
        first = True
        while True:
            for g in self._epoch_groups(epoch):
                if first:
                    if rem >= g.n_rows:
                        rem -= g.n_rows
                        continue
                    first = False
                    yield g, rem
                else:
                    yield g, 0
            epoch += 1

    def _load(self, g: _Group) -> np.ndarray:
        """Training rows of a group, permuted by (seed, epoch, group)."""
        d = self.store.d_model
        out = np.empty((g.n_rows, d * len(self.hooks)), dtype=np.float32)
        at = 0
        for a, b in g.chunks:
            m = self.mask[a:b]
            n = int(m.sum())
            if n:
                for j, h in enumerate(self.hooks):
                    out[at:at + n, j * d:(j + 1) * d] = self.store.activations(h, a, b)[m]
                at += n
        if self.check_finite and not np.isfinite(out).all():
            bad = [(a, b) for a, b in g.chunks if not np.isfinite(read_rows(self.store, self.hooks, a, b)).all()]
            raise UserError(f"store {self.store.path!r} hook {self.hook!r} has NaN/inf activations in rows "
                            f"{bad[0][0]}..{bad[0][1]}; recollect those rows (e.g. with float32 storage)")
        return out[_rng(self.seed, g.epoch, g.index, 1).permutation(g.n_rows)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def produce() -> None:
            try:
                for g, off in self._groups_from(self.position):
                    data = self._load(g)[off:]
                    while not stop.is_set():
                        try:
                            q.put(data, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        t = threading.Thread(target=produce, name="sae-loader", daemon=True)
        t.start()
        try:
            pending: list[np.ndarray] = []
            have = 0
            while True:
                while have < self.batch_size:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    pending.append(item)
                    have += len(item)
                if len(pending) == 1 and len(pending[0]) >= self.batch_size:
                    buf = pending[0]
                    batch, rest = buf[:self.batch_size], buf[self.batch_size:]
                else:
                    cat = np.concatenate(pending)
                    batch, rest = cat[:self.batch_size], cat[self.batch_size:]
                pending = [rest] if len(rest) else []
                have = len(rest)
                self.position += self.batch_size
                if self.world > 1:
                    per = self.batch_size // self.world
                    batch = batch[self.rank * per:(self.rank + 1) * per]
                yield torch.from_numpy(np.ascontiguousarray(batch))
        finally:
            stop.set()


def sample_rows(store: Store, hook: str | Sequence[str], n: int, seed: int = 0, split: Split = "train") -> np.ndarray:
    """Up to n rows of a split from randomly chosen whole chunks (for scale and b_dec estimates)."""
    hooks = hook_list(hook)
    chunks = store.chunk_ranges()
    out, have = [], 0
    for i in _rng(seed, 7).permutation(len(chunks)):
        a, b = chunks[i]
        m = store.split_mask(split, a, b)
        if m.any():
            rows = read_rows(store, hooks, a, b)[m]
            out.append(rows)
            have += len(rows)
            if have >= n:
                break
    if not out:
        return np.empty((0, store.d_model * len(hooks)), dtype=np.float32)
    return np.concatenate(out)[:n]


def heldout_rows(store: Store, hook: str | Sequence[str], n: int) -> np.ndarray:
    """The first n held-out keep rows in store order (a fixed evaluation set; never trained on)."""
    hooks = hook_list(hook)
    mask = store.split_mask("heldout")
    out, have = [], 0
    for a, b in store.chunk_ranges():
        m = mask[a:b]
        if m.any():
            out.append(read_rows(store, hooks, a, b)[m])
            have += int(m.sum())
            if have >= n:
                break
    if not out:
        return np.empty((0, store.d_model * len(hooks)), dtype=np.float32)
    return np.concatenate(out)[:n]

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

Lanes (`lanes` L, `--data-lanes`): the chunks are dealt round-robin into L disjoint lanes, each an
independent stream as above (its own seed key, buffer_rows/L rows of buffer), and every global
batch of B rows is the concatenation of B/L rows from each lane in lane order. L = 1 is the
single stream. Data parallel (rank r of N): when N divides L, rank r runs only lanes
[r·L/N, (r+1)·L/N), so it reads only the chunks its slice of every global batch comes from
(1/N of the bytes) and the N slices together are exactly the single-process batch at the same L.
When N does not divide L, every rank walks all lanes and keeps rows [r·B/N, (r+1)·B/N) of each
global batch (it reads everything and discards the rest; the trainer warns).
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


class _Lane:
    """One seeded, infinite row stream over a fixed set of chunks (the whole store when L = 1)."""

    def __init__(self, loader: "ShuffledLoader", chunk_ids: np.ndarray, key: tuple[int, ...], buffer_rows: int):
        self.loader, self.key = loader, key
        self.chunks = [loader.chunks[i] for i in chunk_ids]
        self.counts = loader.counts[chunk_ids]
        self.n_rows = int(self.counts.sum())
        self.chunks_per_group = max(1, buffer_rows // max(loader.store.chunk_rows, 1))

    def _epoch_groups(self, epoch: int) -> list[_Group]:
        order = _rng(*self.key, epoch).permutation(len(self.chunks))
        groups = []
        for gi, s in enumerate(range(0, len(order), self.chunks_per_group)):
            idx = order[s:s + self.chunks_per_group]
            groups.append(_Group(epoch, gi, [self.chunks[i] for i in idx], int(self.counts[idx].sum())))
        return groups

    def groups_from(self, row: int) -> Iterator[tuple[_Group, int]]:
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

    def load(self, g: _Group) -> np.ndarray:
        """Training rows of a group (every hook point side by side), permuted by (seed key, epoch, group)."""
        ld, st = self.loader, self.loader.store
        d = st.d_model
        out = np.empty((g.n_rows, d * len(ld.hooks)), dtype=np.float32)
        at = 0
        for a, b in g.chunks:
            m = ld.mask[a:b]
            n = int(m.sum())
            if n:
                for j, h in enumerate(ld.hooks):
                    out[at:at + n, j * d:(j + 1) * d] = st.activations(h, a, b)[m]
                ld.bytes_read += (b - a) * ld.row_bytes
                at += n
        if ld.check_finite and not np.isfinite(out).all():
            bad = [(a, b) for a, b in g.chunks if not np.isfinite(read_rows(st, ld.hooks, a, b)).all()]
            raise UserError(f"store {st.path!r} hook {ld.hook!r} has NaN/inf activations in rows "
                            f"{bad[0][0]}..{bad[0][1]}; recollect those rows (e.g. with float32 storage)")
        return out[_rng(*self.key, g.epoch, g.index, 1).permutation(g.n_rows)]


class ShuffledLoader:
    """Infinite iterator of float32 [batch_size / world, H·d] training batches (this rank's slice of
    each global batch; H hook points side by side) starting at global row `position`. `bytes_read` counts the activation bytes
    this process read from the store; `pin_memory` yields page-locked tensors (for non-blocking
    copies to a CUDA device)."""

    def __init__(self, store: Store, hook: str | Sequence[str], batch_size: int, seed: int = 0, position: int = 0,
                 buffer_rows: int = 1 << 17, split: Split = "train", check_finite: bool = True,
                 rank: int = 0, world: int = 1, lanes: int = 1, pin_memory: bool = False):
        self.hooks = hook_list(hook)
        check_hooks(store, self.hooks)
        hook = ",".join(self.hooks)
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the number of ranks ({world}) "
                            f"so every rank gets an equal slice of each global batch")
        if lanes < 1 or batch_size % lanes:
            raise UserError(f"--batch-size {batch_size} must be a multiple of --data-lanes {lanes}; "
                            f"use a lane count that divides the batch size")
        self.store, self.hook, self.batch_size, self.seed = store, hook, batch_size, seed
        self.rank, self.world, self.n_lanes, self.pin_memory = rank, world, lanes, pin_memory
        self.position = position
        self.check_finite = check_finite
        self.bytes_read = 0
        self.row_bytes = len(self.hooks) * store.d_model * (2 if store.dtype in ("float16", "bfloat16") else 4)
        self.mask = store.split_mask(split)  # bool [n_tokens], small next to the activations
        self.chunks = store.chunk_ranges()
        self.counts = np.array([int(self.mask[a:b].sum()) for a, b in self.chunks], dtype=np.int64)
        self.n_rows = int(self.counts.sum())
        if self.n_rows < batch_size:
            raise UserError(f"store {store.path!r} has {self.n_rows} {split} rows for hook {hook!r}, fewer than one "
                            f"batch (--batch-size {batch_size}); collect more tokens or lower --batch-size")
        if lanes > len(self.chunks):
            raise UserError(f"--data-lanes {lanes} is more than the {len(self.chunks)} chunks of store {store.path!r}; "
                            f"use at most {len(self.chunks)} lanes")
        per_lane = batch_size // lanes
        self.lanes = [_Lane(self, np.arange(i, len(self.chunks), lanes), (seed,) if lanes == 1 else (seed, 1000 + i),
                            buffer_rows // lanes) for i in range(lanes)]
        short = [i for i, ln in enumerate(self.lanes) if ln.n_rows < per_lane]
        if short:
            raise UserError(f"lane {short[0]} of --data-lanes {lanes} has {self.lanes[short[0]].n_rows} {split} rows, "
                            f"fewer than its {per_lane} rows of each batch; use fewer lanes")
        self.local = lanes % world == 0  # each rank runs only its own lanes
        if self.local:
            n = lanes // world
            self.mine = list(range(rank * n, (rank + 1) * n))
        else:
            self.mine = list(range(lanes))
        # single-lane compatibility for bench/train.py
        self.chunks_per_group = self.lanes[0].chunks_per_group
        self._epoch_groups = self.lanes[0]._epoch_groups
        self._load = self.lanes[0].load

    def _produce(self, lane: _Lane, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for g, off in lane.groups_from(self.position // self.n_lanes):
                data = lane.load(g)[off:]
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

    @staticmethod
    def _take(q: queue.Queue, state: list, n: int) -> np.ndarray:
        """The next n rows of one lane's stream (state = [pending arrays, rows pending])."""
        pending, have = state
        while have < n:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            pending.append(item)
            have += len(item)
        buf = pending[0] if len(pending) == 1 else np.concatenate(pending)
        batch, rest = buf[:n], buf[n:]
        state[0] = [rest] if len(rest) else []
        state[1] = len(rest)
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = threading.Event()
        queues: dict[int, queue.Queue] = {i: queue.Queue(maxsize=1) for i in self.mine}
        threads = [threading.Thread(target=self._produce, args=(self.lanes[i], queues[i], stop),
                                    name=f"sae-loader-{i}", daemon=True) for i in self.mine]
        for t in threads:
            t.start()
        states = {i: [[], 0] for i in self.mine}
        per_lane = self.batch_size // self.n_lanes
        try:
            while True:
                parts = [self._take(queues[i], states[i], per_lane) for i in self.mine]
                batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
                self.position += self.batch_size
                if self.world > 1 and not self.local:
                    per = self.batch_size // self.world
                    batch = batch[self.rank * per:(self.rank + 1) * per]
                out = torch.from_numpy(np.ascontiguousarray(batch))
                yield out.pin_memory() if self.pin_memory else out
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

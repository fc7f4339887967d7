"""The activation store: one Zarr v3 group per collection run (see DESIGN.md).

    activations/<hook point>  [n_tokens, d_model]  float16 | float32 | bfloat16 (as a uint16 view)
    tokens [n] int32, seq [n] int64, pos [n] int32, keep [n] bool, heldout [n] bool

Writes are whole shards only (a partial shard write rewrites the shard, and two writers in one
shard lose data). A shard is committed by raising the `n_tokens` attribute after its data is
written, so a crash loses at most the shard in flight and a resumed run rewrites exactly that.

A run collected by N ranks (torchrun) is a root group holding the shared attributes (written by
rank 0 alone, with `parts` = the part paths in rank order) and one part per rank,
`parts/rank{r}/`, laid out exactly like a single-process store and written by that rank alone
(its own `n_tokens`/`complete`), so no two processes ever write the same shard or the same
zarr.json. `Store` presents the parts, in rank order, as one dataset with global row indices.

Paths are local paths or fsspec URLs (`file://`, `memory://`, `s3://` with s3fs, …).
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
import typing
from typing import Any, Literal

import numpy as np
import zarr

from saeforge.errors import UserError
from saeforge.urls import free_bytes, is_local, join, local_path, url_to_fs  # noqa: F401  (free_bytes re-exported)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
StorageDtype = Literal["float16", "float32", "bfloat16"]
STORAGE_DTYPES: tuple[str, ...] = typing.get_args(StorageDtype)
Split = Literal["heldout", "train", "all"]  # which rows a reader takes
SPLITS: tuple[str, ...] = typing.get_args(Split)
ROW_ARRAYS = {"tokens": "int32", "seq": "int64", "pos": "int32", "keep": "bool", "heldout": "bool"}
# attributes that must match for a run to continue an existing store
RESUME_KEYS = ("format_version", "model_hash", "hook_points", "d_model", "dtype", "context", "corpus",
               "prepend_bos", "heldout_fraction", "outlier_norm", "shard_rows", "rank", "world_size")


def storage_np_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 → float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def zarr_target(path: str) -> str:
    """What zarr.open_group gets: a plain path for local stores (zarr's LocalStore creates folders;
    its fsspec store on file:// does not), the URL itself otherwise (zarr wraps it in an FsspecStore)."""
    return local_path(path) if is_local(path) else path


def part_name(rank: int) -> str:
    """The sub-group a rank writes in a multi-rank store."""
    return f"parts/rank{rank}"


def store_exists(path: str) -> bool:
    """Whether a Zarr group (its zarr.json) is at `path`; remote URLs are checked through fsspec."""
    if is_local(path):
        return os.path.isfile(os.path.join(local_path(path), "zarr.json"))
    fs, root = url_to_fs(path)
    return bool(fs.exists(root.rstrip("/") + "/zarr.json"))


def _open_group(path: str, mode: Literal["r", "r+", "a", "w", "w-"]) -> zarr.Group:
    try:
        return zarr.open_group(zarr_target(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise UserError(f"activation store {path!r} not found; run `saeforge collect --out {path}` first") from None
    except ImportError as e:
        raise UserError(f"store URL {path!r} needs an fsspec backend that is not installed ({e}); "
                        f"install it (e.g. `pip install s3fs` for s3://) or use a local path") from None
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"store {path!r}: its zarr.json is damaged ({type(e).__name__}: {e}); restore it or "
                        f"collect the store again") from None


def _member_array(group: zarr.Group, name: str) -> zarr.Array:
    """group[name], which must be an array (a KeyError when it is missing)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise UserError(f"{name!r} in store {group.store} is not an array; the store is damaged")
    return node


def _member_group(group: zarr.Group, name: str) -> zarr.Group:
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise UserError(f"{name!r} in store {group.store} is not a group; the store is damaged")
    return node


def _not_a_store(path: str) -> UserError:
    """Why `path` cannot be opened as a store, in one line."""
    if is_local(path):
        p = local_path(path)
        if os.path.isfile(p):
            return UserError(f"{path!r} is a file, not an activation store; pass the --out directory of "
                             f"`saeforge collect`")
        if os.path.isdir(p):
            return UserError(f"{path!r} is a directory but not an activation store (no zarr.json); pass the --out "
                             f"directory of `saeforge collect`")
    return UserError(f"activation store {path!r} not found; run `saeforge collect --out {path}` first")


class Store:
    """Read-only view of a store: metadata, rows by range, chunk-aligned ranges for fast reads.

    Row indices are global. A multi-rank store reads as its parts concatenated in rank order
    (rows of one sequence stay contiguous; chunk ranges never cross a part boundary)."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self.attrs: dict[str, Any] = dict(group.attrs)
        if self.attrs.get("format") != "saeforge-activations":
            raise UserError(f"{path!r} is not a saeforge activation store (no 'format' attribute); "
                            f"pass a store written by `saeforge collect`")
        missing = [k for k in ("hook_points", "d_model", "n_tokens", "context", "model", "model_hash", "dtype",
                               "chunk_rows", "shard_rows", "complete") if k not in self.attrs]
        if missing:
            raise UserError(f"store {path!r} lacks the attribute(s) {missing}: it is damaged or from an older "
                            f"saeforge; collect it again")
        names = self.attrs.get("parts") or []
        if names:  # committed rows of each part, read from the part's own attributes
            self._parts = [_member_group(group, name) for name in names]
            counts = [int(typing.cast(int, p.attrs.get("n_tokens", 0))) for p in self._parts]
        else:
            self._parts = [group]
            counts = [int(typing.cast(int, self.attrs["n_tokens"]))]
        self.part_offsets: list[int] = [int(x) for x in np.cumsum([0, *counts])]
        self.attrs["n_tokens"] = self.part_offsets[-1]
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self.hooks: list[str] = list(self.attrs["hook_points"])
        self.d_model: int = int(self.attrs["d_model"])
        self.n_tokens: int = int(self.attrs["n_tokens"])
        self.context: int = int(self.attrs["context"])
        self.complete: bool = bool(self.attrs["complete"])
        self.model_spec: str = self.attrs["model"]
        self.model_hash: str = self.attrs["model_hash"]
        self.dtype: str = self.attrs["dtype"]
        self.chunk_rows: int = int(self.attrs["chunk_rows"])
        self.shard_rows: int = int(self.attrs["shard_rows"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        path = str(path)
        if not store_exists(path):
            raise _not_a_store(path)
        store = cls(_open_group(path, "r"), path)
        return store

    @property
    def n_parts(self) -> int:
        return len(self._parts)

    def _check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise UserError(f"hook point {hook!r} is not in store {self.path!r}; it holds {self.hooks}")

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        if not 0 <= start <= stop:
            raise ValueError(f"bad row range [{start}, {stop}) for a store of {self.n_tokens} rows")
        return start, stop

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(part, local start, local stop) covering global rows [start, stop), in order."""
        out = []
        for i, (o, e) in enumerate(zip(self.part_offsets, self.part_offsets[1:])):
            a, b = max(start, o), min(stop, e)
            if b > a:
                out.append((i, a - o, b - o))
        return out

    def _array(self, part: int, name: str) -> zarr.Array:
        arr = self._arrays.get((part, name))
        if arr is None:
            arr = self._arrays[(part, name)] = _member_array(self._parts[part], name)
        return arr

    def _read(self, name: str, start: int, stop: int | None) -> np.ndarray:
        start, stop = self._range(start, stop)
        pieces = self._pieces(start, stop)
        if len(pieces) == 1:
            i, a, b = pieces[0]
            return np.asarray(self._array(i, name)[a:b])
        if not pieces:
            return np.asarray(self._array(0, name)[0:0])
        return np.concatenate([np.asarray(self._array(i, name)[a:b]) for i, a, b in pieces])

    def chunk_ranges(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """Chunk-aligned [a, b) ranges covering [start, stop): reading these is the fast path."""
        start, stop = self._range(start, stop)
        c = self.chunk_rows
        out = []
        for i, a, b in self._pieces(start, stop):
            o = self.part_offsets[i]
            for e in range((a // c) * c, b, c):
                lo, hi = max(e, a), min(e + c, b)
                if hi > lo:
                    out.append((o + lo, o + hi))
        return out

    def raw_activations(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows as stored (bfloat16 comes back as its uint16 view)."""
        self._check_hook(hook)
        return self._read(f"activations/{hook}", start, stop)

    def activations(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 [rows, d_model]."""
        raw = self.raw_activations(hook, start, stop)
        if self.dtype == "bfloat16":
            return bf16_bits_to_f32(raw)
        return raw.astype(np.float32, copy=False)

    def _rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        return self._read(name, start, stop)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("tokens", start, stop)

    def seq(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("seq", start, stop)

    def pos(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("pos", start, stop)

    def keep(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("keep", start, stop)

    def heldout(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("heldout", start, stop)

    def in_split(self, split: Split, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of one split, keep or not: 'train' (not held out), 'heldout', or 'all'."""
        if split == "all":
            a, b = self._range(start, stop)
            return np.ones(b - a, dtype=bool)
        held = self.heldout(start, stop)
        if split == "heldout":
            return held
        if split == "train":
            return ~held
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")

    def split_mask(self, split: Split, start: int = 0, stop: int | None = None) -> np.ndarray:
        """keep rows of one split (what training and evaluation read)."""
        return self.keep(start, stop) & self.in_split(split, start, stop)


@dataclass
class ShardPlan:
    """Rows per chunk (read unit) and per shard (write unit); shards hold whole sequences."""
    chunk_rows: int
    shard_rows: int

    @classmethod
    def for_rows(cls, context: int, row_bytes: int, shard_rows: int | None = None,
                 chunk_bytes: int = 4 << 20, chunks_per_shard: int = 8) -> "ShardPlan":
        if shard_rows is not None:
            if shard_rows % context:
                raise UserError(f"--shard-rows {shard_rows} must be a multiple of --context {context}")
            chunk = shard_rows // chunks_per_shard if shard_rows % chunks_per_shard == 0 else shard_rows
            return cls(chunk_rows=chunk, shard_rows=shard_rows)
        seqs = max(1, round(chunk_bytes / (context * row_bytes)))
        return cls(chunk_rows=seqs * context, shard_rows=seqs * context * chunks_per_shard)


class StoreWriter:
    """Creates or resumes a store and commits whole shards, in order, from one process."""

    def __init__(self, path: str, attrs: dict[str, Any], plan: ShardPlan):
        self.path = path
        self.plan = plan
        self.hooks: list[str] = list(attrs["hook_points"])
        d, dtype = int(attrs["d_model"]), attrs["dtype"]
        old = _existing_attrs(path)
        if old is not None and (int(old.get("n_tokens", 0)) > 0 or old.get("parts")):
            _check_resume(path, old, attrs)
            self.group = _open_group(path, "r+")
            self.n_committed = int(old["n_tokens"])
            self.complete = bool(old.get("complete", False))
            self.attrs = old
            try:
                arrays = self._arrays()
            except KeyError as e:
                raise UserError(f"store {path!r} records {self.n_committed} rows but its array {e} is missing: "
                                f"the store is damaged; delete it and collect again") from None
            for arr in arrays:
                arr.resize((self.n_committed, *arr.shape[1:]))
            # the config of the run now writing (e.g. a larger --max-tokens) becomes the recorded one
            self.update_attrs(config=attrs.get("config", old.get("config")))
            return
        if old is not None:
            log.info("store %s has no committed rows (an earlier run stopped while creating it): starting over", path)
        if dtype not in STORAGE_DTYPES:
            raise UserError(f"--dtype {dtype!r} is not a storage dtype; use one of {STORAGE_DTYPES}")
        self.attrs = {**attrs, "format": "saeforge-activations", "format_version": FORMAT_VERSION,
                      "n_tokens": 0, "complete": False, "chunk_rows": plan.chunk_rows,
                      "shard_rows": plan.shard_rows}
        # every attribute in the one zarr.json write that creates the group: a kill at any point
        # leaves no group, or a group that says "0 rows committed" (which the next run restarts)
        self.group = _create_group(path, self.attrs)
        for hook in self.hooks:
            self.group.create_array(f"activations/{hook}", shape=(0, d), dtype=storage_np_dtype(dtype),
                                        chunks=(plan.chunk_rows, d), shards=(plan.shard_rows, d),
                                        compressors=None, fill_value=0,
                                        attributes={"logical_dtype": "bfloat16"} if dtype == "bfloat16" else None)
        for name, dt in ROW_ARRAYS.items():
            self.group.create_array(name, shape=(0,), dtype=dt, chunks=(plan.chunk_rows,),
                                    shards=(plan.shard_rows,), compressors=None, fill_value=0)
        self.n_committed = 0
        self.complete = False

    def reopen(self) -> None:
        """Make a complete store collectable again (a larger --max-tokens): back to the last shard
        boundary, since shards are only ever written whole; those rows are collected again."""
        keep = self.n_committed - self.n_committed % self.plan.shard_rows
        for arr in self._arrays():
            arr.resize((keep, *arr.shape[1:]))
        self.n_committed = keep
        self.complete = False
        self.update_attrs(n_tokens=keep, complete=False)

    def _arrays(self) -> list[zarr.Array]:
        return [_member_array(self.group, f"activations/{h}") for h in self.hooks] + \
            [_member_array(self.group, n) for n in ROW_ARRAYS]

    def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows [start, start+n) of every array and commit them. `start` must be the
        committed end and a shard boundary; only the final write may be shorter than a shard."""
        n = len(rows["tokens"])
        if start != self.n_committed or start % self.plan.shard_rows:
            raise RuntimeError(f"write at row {start} but {self.n_committed} rows are committed "
                               f"(shard size {self.plan.shard_rows}): writes must be whole shards in order")
        end = start + n
        try:
            for hook in self.hooks:
                arr = _member_array(self.group, f"activations/{hook}")
                arr.resize((end, arr.shape[1]))
                arr[start:end] = rows[hook][:n]
            for name in ROW_ARRAYS:
                arr = _member_array(self.group, name)
                arr.resize((end,))
                arr[start:end] = rows[name][:n]
            self.group.update_attributes({"n_tokens": end})
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"disk full while writing {self.path!r} at row {start}; free space or choose "
                                f"another --out, then rerun the same command to resume") from None
            raise
        self.n_committed = end

    def update_attrs(self, **kw: Any) -> None:
        """Set attributes in one zarr.json write."""
        self.attrs.update(kw)
        self.group.update_attributes(kw)

    def finish(self, **kw: Any) -> None:
        self.update_attrs(complete=True, **kw)
        self.complete = True


class PartsRoot:
    """The root group of a multi-rank store. Only rank 0 creates or updates it; each rank writes
    its own part (a StoreWriter at `join(path, part_name(rank))`)."""

    def __init__(self, path: str, attrs: dict[str, Any], plan: ShardPlan, world_size: int):
        self.path, self.world_size = path, world_size
        self.parts = [part_name(r) for r in range(world_size)]
        new = {**attrs, "world_size": world_size}
        if store_exists(path):
            self.group = _open_group(path, "r+")
            old = dict(self.group.attrs)
            _check_resume(path, old, new)
            if not old.get("parts"):
                raise UserError(f"store {path!r} was written by a single process (world_size 1) but this run has "
                                f"world_size {world_size}; resume it without torchrun, or use a new --out")
            self.attrs = old
        else:
            if attrs["dtype"] not in STORAGE_DTYPES:
                raise UserError(f"--dtype {attrs['dtype']!r} is not a storage dtype; use one of {STORAGE_DTYPES}")
            self.attrs = {**new, "format": "saeforge-activations", "format_version": FORMAT_VERSION,
                          "parts": self.parts, "n_tokens": 0, "complete": False,
                          "chunk_rows": plan.chunk_rows, "shard_rows": plan.shard_rows}
            self.group = _create_group(path, self.attrs)
            self.group.create_group("parts")
        self.complete = bool(self.attrs["complete"])

    def update_attrs(self, **kw: Any) -> None:
        """Set attributes in one zarr.json write."""
        self.attrs.update(kw)
        self.group.update_attributes(kw)

    def part_status(self) -> list[tuple[int, bool]]:
        """(committed rows, complete) of every part, read fresh from the parts' own attributes."""
        out = []
        for name in self.parts:
            p = join(self.path, name)
            a: dict[str, Any] = dict(_open_group(p, "r").attrs) if store_exists(p) else {}
            out.append((int(a.get("n_tokens", 0)), bool(a.get("complete", False))))
        return out

    def finish(self, n_tokens: int, **kw: Any) -> None:
        self.update_attrs(n_tokens=n_tokens, complete=True, **kw)
        self.complete = True


def _existing_attrs(path: str) -> dict[str, Any] | None:
    """The attributes of the group at `path`, None when there is none; refuses a foreign group."""
    if not store_exists(path):
        return None
    old = dict(_open_group(path, "r").attrs)
    if old.get("format") != "saeforge-activations":
        raise UserError(f"{path!r} exists and is not a saeforge activation store; choose another --out")
    return old


def _create_group(path: str, attrs: dict[str, Any]) -> zarr.Group:
    """A new group (replacing whatever group is at `path`) whose zarr.json holds `attrs` from the start."""
    try:
        return zarr.open_group(zarr_target(path), mode="w", attributes=attrs)
    except ImportError as e:
        raise UserError(f"store URL {path!r} needs an fsspec backend that is not installed ({e}); "
                        f"install it (e.g. `pip install s3fs` for s3://) or use a local path") from None


def _check_resume(path: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to continue a store written by another model, hook set, d_model or layout."""
    if old.get("format") != "saeforge-activations":
        raise UserError(f"{path!r} exists and is not a saeforge activation store; choose another --out")
    if "world_size" in new and old.get("world_size", 1) != new["world_size"]:
        raise UserError(f"store {path!r} was collected by {old.get('world_size', 1)} rank(s) but this run has "
                        f"world_size {new['world_size']}; resume it with the same number of ranks "
                        f"(torchrun --nnodes × --nproc-per-node = {old.get('world_size', 1)}), or use a new --out")
    for key in RESUME_KEYS:
        was = old.get(key, (old.get("config") or {}).get(key))  # older stores kept some keys in config only
        if key in new and was is not None and was != new[key]:
            raise UserError(f"store {path!r} was written with {key}={was!r} but this run has {key}={new[key]!r}; "
                            f"rerun with {key}={was!r} to continue it, or use a new --out to start over")

"""Stores at fsspec URLs (file://, memory://; s3:// needs s3fs) and the multi-rank layout's reader:
parts in rank order read as one dataset with global rows, chunk ranges inside parts."""
from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import numpy as np
import pytest

from saeforge.errors import UserError
from saeforge.urls import join
from collect.store import PartsRoot, ShardPlan, Store, StoreWriter, part_name

D, CTX = 8, 16
ATTRS = {"hook_points": ["layers.0.resid_post"], "d_model": D, "dtype": "float32", "context": CTX,
         "model": "synthetic", "model_hash": "h0", "tokenizer": "none", "corpus": "synthetic", "config": {}}


def _rows(seqs: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(seqs) * CTX
    return {"layers.0.resid_post": rng.standard_normal((n, D)).astype(np.float32),
            "tokens": rng.integers(0, 1000, n).astype(np.int32), "seq": np.repeat(np.array(seqs, np.int64), CTX),
            "pos": np.tile(np.arange(CTX, dtype=np.int32), len(seqs)), "keep": rng.random(n) > 0.1,
            "heldout": np.repeat(np.array([s % 5 == 4 for s in seqs]), CTX)}


def _write(writer: StoreWriter, rows: dict[str, np.ndarray]) -> None:
    n, s = len(rows["tokens"]), writer.plan.shard_rows
    for a in range(0, n, s):
        writer.write(a, {k: v[a:a + s] for k, v in rows.items()})
    writer.finish()


def _parts_store(root: str, n_seqs: tuple[int, ...] = (11, 10), shard_rows: int = 64) -> list[dict[str, np.ndarray]]:
    """A multi-rank store written the way ranks write it; returns each part's rows."""
    plan = ShardPlan.for_rows(CTX, D * 4, shard_rows=shard_rows)
    ws = len(n_seqs)
    PartsRoot(root, ATTRS, plan, ws)
    rng = np.random.default_rng(0)
    out = []
    for r, n in enumerate(n_seqs):
        rows = _rows([r + k * ws for k in range(n)], rng)
        _write(StoreWriter(join(root, part_name(r)), {**ATTRS, "rank": r, "world_size": ws}, plan), rows)
        out.append(rows)
    return out


@pytest.mark.parametrize("where", ["local", "memory"])
def test_parts_read_as_one_dataset(tmp_path, where):
    root = str(tmp_path / "p.zarr") if where == "local" else f"memory://saeforge-test-{uuid.uuid4().hex}/p.zarr"
    parts = _parts_store(root)
    store = Store.open(root)
    assert store.n_parts == 2 and store.part_offsets == [0, 11 * CTX, 21 * CTX]
    assert store.n_tokens == 21 * CTX and not store.complete  # rank 0 has not marked the root complete
    want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    np.testing.assert_array_equal(store.activations("layers.0.resid_post"), want["layers.0.resid_post"])
    for name in ("tokens", "seq", "pos", "keep", "heldout"):
        np.testing.assert_array_equal(getattr(store, name)(), want[name])
    # a read spanning the part boundary is the two pieces concatenated
    a, b = 11 * CTX - 5, 11 * CTX + 7
    np.testing.assert_array_equal(store.activations("layers.0.resid_post", a, b), want["layers.0.resid_post"][a:b])
    np.testing.assert_array_equal(store.split_mask("train", a, b), (want["keep"] & ~want["heldout"])[a:b])
    assert store.tokens(a, a).shape == (0,)
    # chunk ranges cover every row once, never cross a part boundary, and are chunk-aligned within a part
    ranges = store.chunk_ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == store.n_tokens
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert (11 * CTX) in [a for a, _ in ranges]
    for a, b in ranges:
        o = max(x for x in store.part_offsets[:-1] if x <= a)
        assert b <= min(x for x in store.part_offsets[1:] if x > a)
        assert (a - o) % store.chunk_rows == 0 or a == 0
        assert b - a <= store.chunk_rows
    assert store.chunk_ranges(a, b)[0][0] == a
    # each part is itself a valid single-rank store
    p1 = Store.open(join(root, part_name(1)))
    assert p1.n_tokens == 10 * CTX and (p1.seq() % 2 == 1).all()


def test_world_size_change_and_layout_mismatch_are_refused(tmp_path):
    root = str(tmp_path / "p.zarr")
    _parts_store(root)
    plan = ShardPlan.for_rows(CTX, D * 4, shard_rows=64)
    with pytest.raises(UserError, match=r"collected by 2 rank\(s\).*world_size 3"):
        PartsRoot(root, ATTRS, plan, 3)
    with pytest.raises(UserError, match=r"collected by 2 rank\(s\).*world_size 1"):
        StoreWriter(root, {**ATTRS, "rank": 0, "world_size": 1}, plan)
    single = str(tmp_path / "s.zarr")
    StoreWriter(single, {**ATTRS, "rank": 0, "world_size": 1}, plan)
    with pytest.raises(UserError, match=r"collected by 1 rank\(s\).*world_size 2"):
        PartsRoot(single, ATTRS, plan, 2)
    PartsRoot(root, ATTRS, plan, 2)  # the same world size resumes


def test_file_and_memory_urls_round_trip(tmp_path):
    plan = ShardPlan.for_rows(CTX, D * 4, shard_rows=64)
    rows = _rows(list(range(9)), np.random.default_rng(1))
    local = tmp_path / "deep" / "er" / "l.zarr"  # file:// creates missing folders like a plain path
    for path in (f"file://{local}", f"memory://saeforge-test-{uuid.uuid4().hex}/m.zarr"):
        _write(StoreWriter(path, ATTRS, plan), rows)
        store = Store.open(path)
        assert store.complete and store.n_tokens == 9 * CTX and store.path == path
        np.testing.assert_array_equal(store.activations("layers.0.resid_post"), rows["layers.0.resid_post"])
        np.testing.assert_array_equal(store.seq(), rows["seq"])
        w = StoreWriter(path, ATTRS, plan)  # reopening resumes: sees the committed rows
        assert w.complete and w.n_committed == 9 * CTX
    assert Store.open(local).n_tokens == 9 * CTX


def test_missing_url_and_missing_backend_are_user_errors():
    with pytest.raises(UserError, match="not found"):
        Store.open(f"memory://saeforge-test-{uuid.uuid4().hex}/none.zarr")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(UserError, match="s3fs"):
            Store.open("s3://saeforge-no-such-bucket/store.zarr")


@pytest.mark.smollm
def test_collect_into_memory_url_equals_local(smollm2, wikitext_dir, tmp_path):
    from collect.collector import CollectConfig, collect_activations
    kw = dict(corpus=str(wikitext_dir / "valid.txt"), hooks=["layers.2.resid_post"], context=64, max_tokens=640,
              batch_size=4, shard_rows=256, quiet=True)
    url = f"memory://saeforge-test-{uuid.uuid4().hex}/store.zarr"
    mem = collect_activations(CollectConfig(out=url, **kw), loaded=smollm2)
    loc = collect_activations(CollectConfig(out=str(tmp_path / "l.zarr"), **kw), loaded=smollm2)
    mem = Store.open(url)
    assert mem.complete and mem.n_tokens == loc.n_tokens == 640
    for name in ("tokens", "seq", "pos", "keep", "heldout"):
        np.testing.assert_array_equal(getattr(mem, name)(), getattr(loc, name)())
    np.testing.assert_array_equal(mem.raw_activations("layers.2.resid_post"), loc.raw_activations("layers.2.resid_post"))
    assert mem.attrs["norm_median"] == loc.attrs["norm_median"]
    assert Path(tmp_path / "l.zarr" / "zarr.json").is_file()

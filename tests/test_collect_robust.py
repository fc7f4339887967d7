"""The collector under hostile conditions: a kill while the store is created, changed settings on
resume, more tokens asked of a complete store, concurrent runs, bad outputs and damaged stores."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from collect.collector import CollectConfig, collect_activations
from collect.store import Store
from saeforge.errors import UserError
from saeforge.locks import exclusive, lock_path

pytestmark = pytest.mark.smollm


def _cfg(tmp_path: Path, wikitext_dir: Path, **kw) -> CollectConfig:
    base = dict(corpus=str(wikitext_dir / "valid.txt"), hooks=["layers.3.resid_post"], context=64, max_tokens=512,
                batch_size=4, out=str(tmp_path / "s.zarr"), shard_rows=256, quiet=True)
    base.update(kw)
    cfg = CollectConfig(**base)
    cfg.validate()
    return cfg


def _same(a: Store, b: Store) -> None:
    assert a.n_tokens == b.n_tokens and a.complete and b.complete
    for name in ("tokens", "seq", "pos", "keep", "heldout"):
        np.testing.assert_array_equal(getattr(a, name)(), getattr(b, name)(), err_msg=name)
    np.testing.assert_array_equal(a.activations("layers.3.resid_post"), b.activations("layers.3.resid_post"))


def test_changed_outlier_norm_on_resume_is_refused(smollm2, wikitext_dir, tmp_path):
    collect_activations(_cfg(tmp_path, wikitext_dir), loaded=smollm2)
    with pytest.raises(UserError, match="outlier_norm=10.0 but this run has outlier_norm=5.0"):
        collect_activations(_cfg(tmp_path, wikitext_dir, outlier_norm=5.0), loaded=smollm2)


def test_complete_store_grows_when_asked_for_more(smollm2, wikitext_dir, tmp_path):
    """A store stopped by --max-tokens 320 (a partial last shard) extended to 768 equals one collected at 768."""
    small = collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=320), loaded=smollm2)
    assert small.n_tokens == 320 and small.complete
    grown = collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=768), loaded=smollm2)
    assert grown.attrs["config"]["max_tokens"] == 768
    direct = collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=768, out=str(tmp_path / "d.zarr")),
                                 loaded=smollm2)
    _same(grown, direct)
    # asking for fewer than it holds changes nothing
    again = collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=256), loaded=smollm2)
    assert again.n_tokens == 768


def test_kill_while_creating_the_store_then_the_same_command_works(smollm2, wikitext_dir, tmp_path):
    """What a kill can leave behind now that attributes go in one write: a group saying 0 rows
    committed, with or without its arrays. The same command starts over and gives the right store."""
    ref = collect_activations(_cfg(tmp_path, wikitext_dir, out=str(tmp_path / "ref.zarr")), loaded=smollm2)
    out = tmp_path / "s.zarr"
    attrs = {**ref.attrs, "n_tokens": 0, "complete": False}
    g = zarr.open_group(str(out), mode="w", attributes=attrs)  # killed right after the group was written
    g.create_array("tokens", shape=(0,), dtype="int32", chunks=(64,))  # … and one array
    _same(collect_activations(_cfg(tmp_path, wikitext_dir), loaded=smollm2), ref)


def test_second_run_on_one_store_is_refused_and_a_dead_owner_blocks_nothing(smollm2, wikitext_dir, tmp_path):
    out = str(tmp_path / "s.zarr")
    with exclusive(out, "store"):
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            collect_activations(_cfg(tmp_path, wikitext_dir), loaded=smollm2)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from saeforge.locks import exclusive\n"
                               f"with exclusive({out!r}, 'store'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert Path(lock_path(out)).exists()
    assert collect_activations(_cfg(tmp_path, wikitext_dir), loaded=smollm2).complete


def test_context_longer_than_the_model_is_refused(smollm2, wikitext_dir, tmp_path):
    with pytest.raises(UserError, match=r"--context 8200 is longer than .* \(8192 positions\)"):
        collect_activations(_cfg(tmp_path, wikitext_dir, context=8200, max_tokens=8200, shard_rows=None),
                            loaded=smollm2)


def test_bad_outputs_fail_before_any_work(tmp_path, wikitext_dir):
    f = tmp_path / "file"
    f.write_text("x")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="is an existing file, not a directory"):
        collect_activations(_cfg(tmp_path, wikitext_dir, out=str(f)))
    with pytest.raises(UserError, match="is a file, so the directory cannot be created"):
        collect_activations(_cfg(tmp_path, wikitext_dir, out=str(f / "s.zarr")))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write a read-only directory (root)")
        with pytest.raises(UserError, match="is not writable"):
            collect_activations(_cfg(tmp_path, wikitext_dir, out=str(ro / "s.zarr")))
    finally:
        ro.chmod(0o700)
    assert time.perf_counter() - t0 < 5  # refused before the model was loaded


def test_damaged_and_foreign_stores_get_one_line(smollm2, wikitext_dir, tmp_path):
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file, not an activation store"):
        Store.open(str(f))
    with pytest.raises(UserError, match="is a directory but not an activation store"):
        Store.open(str(tmp_path))
    store = collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=256), loaded=smollm2)
    meta = Path(store.path) / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(UserError, match="zarr.json is damaged"):
        Store.open(store.path)
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", attributes={"x": 1})
    assert other is not None
    with pytest.raises(UserError, match="not a saeforge activation store"):
        Store.open(str(tmp_path / "other.zarr"))
    with pytest.raises(UserError, match="exists and is not a saeforge activation store"):
        collect_activations(_cfg(tmp_path, wikitext_dir, out=str(tmp_path / "other.zarr")), loaded=smollm2)

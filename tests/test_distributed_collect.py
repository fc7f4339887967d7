"""Collection under torchrun with two local gloo ranks on CPU: the store holds exactly the rows a
single process collects from the same corpus (up to order: nothing missing, nothing twice), and a
run whose whole process tree is SIGKILLed resumes per rank to the same rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from collect.collector import CollectConfig, collect_activations
from saeforge.errors import UserError
from collect.store import Store

pytestmark = pytest.mark.smollm
ROOT = Path(__file__).resolve().parent.parent
HOOK = "layers.2.resid_post"
CTX = 64


def _args(corpus: Path, out: Path, max_tokens: int) -> list[str]:
    return ["--corpus", str(corpus), "--hooks", HOOK, "--context", str(CTX), "--max-tokens", str(max_tokens),
            "--batch-size", "4", "--shard-rows", "256", "--out", str(out), "--quiet"]


def _torchrun(corpus: Path, out: Path, max_tokens: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "collect", "collect", *_args(corpus, out, max_tokens)]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(smollm2, wikitext_dir, tmp_path_factory) -> Store:
    """Single-process run of 8192 tokens; its first 4096 rows are the single-process run of 4096
    (one process writes sequences in order, with the same batches)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return collect_activations(CollectConfig(corpus=str(wikitext_dir / "valid.txt"), hooks=[HOOK], context=CTX,
                                             max_tokens=8192, batch_size=4, shard_rows=256, out=str(out), quiet=True),
                               loaded=smollm2)


def _keyed(store: Store, stop: int | None = None) -> dict[str, np.ndarray]:
    """Rows sorted by (seq, pos), with a check that no key occurs twice."""
    seq, pos = store.seq(0, stop), store.pos(0, stop)
    order = np.lexsort((pos, seq))
    key = seq[order] * CTX + pos[order]
    assert (np.diff(key) > 0).all(), "a (seq, pos) row occurs twice"
    out = {"key": key, "acts": store.activations(HOOK, 0, stop)[order]}
    for name in ("tokens", "keep", "heldout"):
        out[name] = getattr(store, name)(0, stop)[order]
    return out


def _assert_same_rows(got: Store, ref: Store, n: int) -> None:
    a, b = _keyed(got), _keyed(ref, n)
    np.testing.assert_array_equal(a["key"], b["key"])  # same rows: nothing missing, nothing twice
    for name in ("tokens", "keep", "heldout"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # float16 storage; batches differ between the runs, so the float32 sums differ in the last bits
    np.testing.assert_allclose(a["acts"], b["acts"], rtol=2e-3, atol=2e-2)


def _check_parts(store: Store, n: int) -> None:
    assert store.complete and store.n_tokens == n and store.n_parts == 2
    assert store.attrs["world_size"] == 2 and store.attrs["parts"] == ["parts/rank0", "parts/rank1"]
    for r in range(2):
        part = Store.open(os.path.join(store.path, "parts", f"rank{r}"))
        seq = part.seq()[::CTX]
        assert part.complete and part.attrs["rank"] == r
        assert (seq % 2 == r).all() and (np.diff(seq) == 2).all(), f"rank {r} holds {seq}"
    ranges = store.chunk_ranges()
    assert sum(b - a for a, b in ranges) == n and store.part_offsets[1] in [a for a, _ in ranges]


def test_two_ranks_hold_exactly_the_single_process_rows(reference, smollm2, wikitext_dir, tmp_path):
    out = tmp_path / "two.zarr"
    rc = subprocess.run(_torchrun(wikitext_dir / "valid.txt", out, 4096), cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert "complete=True in 2 parts" in rc.stdout and rc.stdout.count("tokens ×") == 1  # only rank 0 prints
    store = Store.open(out)
    _check_parts(store, 4096)
    # the keep-mask calibration is the single process's (first global batch), whatever the rank count
    for h, m in reference.attrs["norm_median"].items():
        assert store.attrs["norm_median"][h] == pytest.approx(m, rel=1e-5)
    _assert_same_rows(store, reference, 4096)
    # a single process may not continue a 2-rank store
    with pytest.raises(UserError, match=r"collected by 2 rank\(s\)"):
        collect_activations(CollectConfig(corpus=str(wikitext_dir / "valid.txt"), hooks=[HOOK], context=CTX,
                                          max_tokens=8192, batch_size=4, shard_rows=256, out=str(out), quiet=True),
                            loaded=smollm2)


def _attrs(path: Path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_each_rank(reference, wikitext_dir, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = _torchrun(wikitext_dir / "valid.txt", out, 8192)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = [out / "parts" / f"rank{r}" for r in range(2)]
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and max(_attrs(p).get("n_tokens", 0) for p in parts) < 256:
        time.sleep(0.02)
    tree = _tree(proc.pid)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
    for pid in tree:  # the whole tree at once: launcher and both workers
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    committed = [_attrs(p).get("n_tokens", 0) for p in parts]
    assert max(committed) >= 256 and not all(_attrs(p).get("complete") for p in parts), committed
    assert not _attrs(out).get("complete")
    rc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    store = Store.open(out)
    _check_parts(store, 8192)
    _assert_same_rows(store, reference, 8192)

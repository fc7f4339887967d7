"""bench/gpu.sh: without CUDA it fails loudly (exit 1, one line); its dry run (toy sizes on CPU)
runs the same collection and training code end to end and prints every figure it would measure."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"


def _run(**env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "SAEFORGE_BENCH_DRY"}
    return subprocess.run(["bash", str(SCRIPT)], env={**e, "OMP_NUM_THREADS": "2", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_refuses_without_cuda():
    p = _run()
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "no CUDA device" in p.stderr


@pytest.mark.slow
@pytest.mark.smollm
def test_dry_run_prints_every_measurement():
    p = _run(SAEFORGE_BENCH_DRY="1")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for needle in ("[collect]", "bare", "collect/bare =", "[train]", "saeforge-float32", "saeforge-bfloat16",
                   "dry run: toy sizes on CPU"):
        assert needle in out, (needle, out)
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("saeforge-") and "/" not in ln]
    assert len(rows) == 2 and all(float(r[3]) < 1.0 for r in rows), out  # each trainer learned something

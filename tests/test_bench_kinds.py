"""bench/train.py --kinds: each kind's dense reference computes that kind's training loss (given the
weights of saeforge's dictionary, on the same batch), and the part prints one timed row per kind."""
from __future__ import annotations

import pytest
import torch

from bench.train_kinds import IN, LAYERS, OUT, bench_kinds, kind_setups, synthetic_kinds_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["topk SAE", "matryoshka", "transcoder", "skip-transcoder", "crosscoder L=2", "crosscoder L=4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bkinds")
    return synthetic_kinds_store(str(tmp / "s.zarr"), n_tokens=2048, d=16, n_features=64, active=3), tmp


def test_dense_references_compute_each_kinds_loss(tiny):
    store, tmp = tiny
    setups = kind_setups(store, IN, OUT, LAYERS, k=4, expansion=2, batch=256, tmp=tmp / "a")
    assert [su.name for su in setups] == NAMES
    for su in setups:
        sae, dense = su.trainer.members[0].sae, su.dense
        with torch.no_grad():
            before = float(dense.loss(su.x, su.y))
            dense.W_enc.copy_(sae.enc.t())
            dense.W_dec.copy_(sae.W_dec)
            dense.b_enc.copy_(sae.b_enc)
            dense.b_dec.copy_(sae.b_dec)
            if dense.W_skip is not None:
                dense.W_skip.copy_(sae.W_skip)
            ours = float(sae(su.x, target=su.y).loss)  # no dead latents: no AuxK term
            theirs = float(dense.loss(su.x, su.y))
        assert theirs == pytest.approx(ours, rel=1e-4), su.name
        assert abs(before - ours) > 1e-3, su.name  # its own random init differs: the check compares something
    assert setups[-1].x.shape == (256, 4 * 16) and setups[2].y is not None and setups[2].y.shape == (256, 16)


def test_the_part_prints_a_row_per_kind(tiny, capsys):
    store, tmp = tiny
    rates = bench_kinds(store, IN, OUT, LAYERS, k=4, expansion=2, batch=256, reps=1, tmp=tmp / "b")
    out = capsys.readouterr().out
    assert list(rates) == NAMES and all(a > 0 and b > 0 for a, b in rates.values())
    for name in NAMES:
        row = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert row.rstrip().endswith("×") and "→" in row, row

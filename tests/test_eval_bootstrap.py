"""Bootstrap intervals: they shrink as sequences grow and cover the true value in a simulation (where
a row-level bootstrap would not); per-sequence sums are exact under block merging; the interval
formulas reproduce the streamed point estimates; too few held-out sequences is one clear line."""
import numpy as np
import pytest
import torch

from saeforge.cli import dispatch
from sae.architectures import ArchConfig, build_sae
from sae.bootstrap import BootstrapSpec, UnitSums, add_intervals, resample_counts
from sae.eval_intervals import _reconstruction_figures, reconstruction_units
from sae.evaluate import ReconstructionAccumulator, evaluate_sae
from sae.io import save_sae
from sae.synthetic import write_synthetic_store

HOOK = "layers.0.resid_post"


def _sequences(rng, n_seq, rows=16, true_mean=1.0, seq_sd=0.5):
    """Per-sequence (sum of y, rows): y = true_mean + a per-sequence effect + row noise."""
    effect = rng.normal(0, seq_sd, n_seq)
    y = true_mean + effect[:, None] + rng.normal(0, 1.0, (n_seq, rows))
    return np.stack([y.sum(1), np.full(n_seq, rows)], 1), y


def _mean_ci(units, resamples=400, seed=0):
    out = {}
    add_intervals(out, units, lambda s: {"mean": s[:, 0] / s[:, 1]}, BootstrapSpec(resamples, seed))
    return out["mean_ci95"]


def test_intervals_shrink_with_more_sequences():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (50, 800):
        lo, hi = _mean_ci(_sequences(rng, n)[0], resamples=1000)
        widths[n] = hi - lo
    assert 2.8 < widths[50] / widths[800] < 5.7  # ~ sqrt(16) = 4


def test_intervals_cover_the_true_value_and_a_row_bootstrap_would_not():
    rng = np.random.default_rng(1)
    hits, row_hits, sims = 0, 0, 300
    for i in range(sims):
        units, y = _sequences(rng, 60)
        lo, hi = _mean_ci(units, seed=i)
        hits += lo <= 1.0 <= hi
        rows = np.stack([y.ravel(), np.ones(y.size)], 1)  # every row its own unit: ignores the sequences
        lo, hi = _mean_ci(rows, resamples=200, seed=i)
        row_hits += lo <= 1.0 <= hi
    assert 0.90 <= hits / sims <= 0.99
    assert row_hits / sims < 0.75


def test_resampling_is_reproducible_and_sums_to_the_unit_count():
    a, b = resample_counts(37, 50, seed=3), resample_counts(37, 50, seed=3)
    assert (a == b).all() and (a.sum(1) == 37).all() and not (a == resample_counts(37, 50, seed=4)).all()


def test_unit_sums_match_per_sequence_sums_through_block_merges():
    rng = np.random.default_rng(2)
    seq = np.repeat(rng.permutation(1000)[:37], rng.integers(1, 9, 37))  # 37 sequences of 1–8 rows, ids unordered
    v = rng.standard_normal((len(seq), 3))
    f = rng.random((len(seq), 5)) < 0.3
    us = UnitSums(max_units=4)  # 37 sequences → blocks of 8 (≤ 8 units)
    for s in range(0, len(seq), 7):
        us.add(seq[s:s + 7], v=torch.from_numpy(v[s:s + 7]), f=torch.from_numpy(f[s:s + 7]).int())
    starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]
    ordinal = np.cumsum(np.isin(np.arange(len(seq)), starts)) - 1
    assert us.n_seq == 37 and us.block == 8 and us.n_units == 5
    for name, x in (("v", v), ("f", f.astype(np.int64))):
        want = np.zeros((5, x.shape[1]))
        np.add.at(want, ordinal // 8, x)
        np.testing.assert_allclose(us.units(name), want, rtol=1e-12)


def test_interval_formulas_reproduce_the_streamed_point_estimates(tmp_path):
    st = write_synthetic_store(str(tmp_path / "s.zarr"), n_tokens=4096, d=16, n_features=64, active=3, context=64,
                               shard_rows=1024, heldout_every=2)
    sae = build_sae(ArchConfig("topk", 16, 64, k=3), generator=torch.Generator().manual_seed(0)).eval()
    m = evaluate_sae(sae, st, HOOK, tokens=None, ci=BootstrapSpec(300, 0, 20, strict=True))
    assert m["n_sequences"] == 32
    # the same sums, not resampled, give the point estimates
    acc = ReconstructionAccumulator(sae, units=UnitSums(64))
    x, keep, held, seq = st.activations(HOOK), st.keep(), st.heldout(), st.seq()
    thr = m["outlier_threshold"]
    acc.add(torch.from_numpy(x[held]), torch.from_numpy(keep[held]), None if thr is None else
            torch.zeros(int(held.sum()), dtype=torch.bool), seq[held])
    packed, layout = reconstruction_units(acc.units, 16, with_outliers=False)
    total = _reconstruction_figures(packed.sum(0, keepdims=True), layout, 16)
    for k in ("fvu", "explained_variance", "mse", "sq_err_per_token", "cossim", "l2_ratio", "l0", "dead_fraction",
              "dense_fraction", "all_rows_fvu", "all_rows_mse"):
        assert total[k][0] == pytest.approx(m[k], rel=1e-9, abs=1e-12), k
        lo, hi = m[k + "_ci95"]
        assert lo <= m[k] + 1e-12 and m[k] - 1e-12 <= hi, k
    assert m["fvu_ci95"][0] < m["fvu"] < m["fvu_ci95"][1]


@pytest.fixture()
def few_heldout(tmp_path):
    """A store with 4 held-out sequences and an SAE trained on it."""
    st = write_synthetic_store(str(tmp_path / "few.zarr"), n_tokens=4096, d=16, n_features=64, active=3, context=64,
                               shard_rows=1024, heldout_every=16)
    sae = build_sae(ArchConfig("topk", 16, 64, k=3), generator=torch.Generator().manual_seed(0)).eval()
    meta = {"hook_point": HOOK, "model": st.model_spec, "model_hash": st.model_hash, "store": st.path}
    return st, save_sae(sae, tmp_path / "sae", meta=meta)


def test_too_few_heldout_sequences_is_one_line_and_exit_2(few_heldout, capsys):
    _, d = few_heldout
    args = ["eval", str(d), "--ce-tokens", "0", "--quiet", "--wandb", "disabled"]
    assert dispatch(args) == 2
    err = capsys.readouterr().err
    assert "only 4 independent units" in err and "--bootstrap 0" in err and len(err.strip().splitlines()) == 1
    assert dispatch(args + ["--bootstrap", "0"]) == 0


def test_library_eval_without_enough_sequences_warns_and_skips_intervals(few_heldout):
    from sae.eval_run import EvalConfig, run_eval
    _, d = few_heldout
    res, _ = run_eval(EvalConfig(sae=str(d), ce_tokens=0, wandb="disabled", quiet=True))  # as the trainer calls it
    m = res["metrics"]
    assert m["n_sequences"] == 4 and "fvu" in m and "fvu_ci95" not in m

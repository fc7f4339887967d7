"""Seed replicas: `train --seed 0,1` trains one SAE per seed in one pass (different weights, seed in
cfg.json); `eval A B C D --compare` groups them by recipe and reports mean ± sd across seeds."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from saeforge.cli import dispatch
from saeforge.config import build_config
from sae.config import TrainConfig, sweep_members
from sae.synthetic import write_synthetic_store


def test_seed_list_is_part_of_the_sweep():
    cfg = build_config(TrainConfig, {}, {"store": "s.zarr", "seed": "0,1,2", "k": "8,16"})
    assert cfg.seed == [0, 1, 2] and cfg.data_seed == 0
    m = sweep_members(cfg, 16)
    assert [x.name for x in m] == [f"topk_k{k}_x8_s{s}" for k in (8, 16) for s in (0, 1, 2)]
    assert [x.init_seed for x in m] == [0, 1000, 2000, 1, 1001, 2001]
    one = sweep_members(build_config(TrainConfig, {"seed": 1}, {"store": "s.zarr"}), 16)  # TOML scalar still works
    assert [(x.name, x.init_seed) for x in one] == [("topk_k32_x8", 1000)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    st = write_synthetic_store(str(tmp / "s.zarr"), n_tokens=8192, d=16, n_features=64, active=3, context=64,
                               shard_rows=1024, heldout_every=4)
    assert dispatch(["train", "--store", st.path, "--out", str(tmp / "sw"), "--k", "2,4", "--expansion", "4",
                     "--seed", "0,1", "--tokens", "4096", "--batch-size", "256", "--quiet", "--scale-sample", "2048",
                     "--wandb", "disabled"]) == 0
    return tmp, st


def test_replicas_differ_and_record_their_seed(replicas):
    tmp, _ = replicas
    dirs = sorted(p.name for p in (tmp / "sw").iterdir())
    assert dirs == ["topk_k2_x4_s0", "topk_k2_x4_s1", "topk_k4_x4_s0", "topk_k4_x4_s1"]
    w0 = load_file(str(tmp / "sw" / "topk_k2_x4_s0" / "sae.safetensors"))["W_dec"]
    w1 = load_file(str(tmp / "sw" / "topk_k2_x4_s1" / "sae.safetensors"))["W_dec"]
    assert not np.allclose(w0, w1)
    assert json.loads((tmp / "sw" / "topk_k2_x4_s1" / "cfg.json").read_text())["seed"] == 1


def test_compare_reports_mean_and_sd_across_seeds(replicas, capsys):
    tmp, _ = replicas
    dirs = [str(tmp / "sw" / n) for n in ("topk_k2_x4_s0", "topk_k2_x4_s1", "topk_k4_x4_s0", "topk_k4_x4_s1")]
    out = tmp / "cmp"
    assert dispatch(["eval", *dirs, "--compare", "--compare-dir", str(out), "--ce-tokens", "0", "--quiet",
                     "--wandb", "disabled"]) == 0
    printed = capsys.readouterr().out
    assert "topk_k2_x4 (mean ± sd, 2 seeds)" in printed and "±" in printed
    cmp = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in cmp["recipes"]] == ["topk_k2_x4", "topk_k4_x4"]
    fvu = {s["name"]: s["metrics"]["fvu"] for s in cmp["saes"]}
    for r in cmp["recipes"]:
        vals = [fvu[n] for n in r["members"]]
        assert r["mean_sd"]["fvu"] == pytest.approx([np.mean(vals), np.std(vals, ddof=1)])
        assert r["seeds"] == [0, 1]
    assert all(s["metrics"]["fvu_ci95"][0] <= s["metrics"]["fvu"] <= s["metrics"]["fvu_ci95"][1] for s in cmp["saes"])
    assert (out / "compare.md").read_text().count("±") > 8
    # --reuse takes each eval.json written above instead of evaluating again
    before = [(tmp / "sw" / n / "eval.json").stat().st_mtime_ns for n in ("topk_k2_x4_s0", "topk_k4_x4_s1")]
    assert dispatch(["eval", *dirs, "--compare", "--compare-dir", str(out), "--ce-tokens", "0", "--quiet",
                     "--wandb", "disabled", "--reuse"]) == 0
    after = [(tmp / "sw" / n / "eval.json").stat().st_mtime_ns for n in ("topk_k2_x4_s0", "topk_k4_x4_s1")]
    assert before == after

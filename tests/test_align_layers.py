"""The cross-layer / cross-model alignment study (seed 004) and its random-init control."""
from __future__ import annotations

import socket

import pytest
import torch
import transformers as tf

from analysis.align_layers import (Unit, neuron_units, overlap, random_init_copy, sae_units, study,
                                   top_inputs_complete)
from analysis.vocab_search import greedy_search, scan_vocab
from sae.architectures import ArchConfig, build_sae
from saeforge.errors import UserError
from tests.tiny_models import CONFIGS, tiny_model

PREFIX = [1]


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tiny_model("llama")


def test_batched_top_inputs_equal_each_features_own_search(model):
    units = neuron_units(model, "resid_post", 6) + neuron_units(model, "mlp_hidden", 6, layers=[2])
    ids, vals = top_inputs_complete(model, units, PREFIX, top=5, batch=37)
    assert ids.shape == (4, 6, 5)
    for u, unit in enumerate(units):
        for f in range(6):
            act, _ = scan_vocab(model, unit.objective(f), PREFIX)
            top = torch.argsort(act, descending=True, stable=True)[:5]
            assert torch.equal(ids[u, f], top), (unit.label, f)
            torch.testing.assert_close(vals[u, f], act[top])


def test_overlap_counts_distinct_shared_tokens():
    a = torch.tensor([[[1, 2, 3, 4]], [[5, 6, 7, 8]]])             # 2 units, 1 feature, 4 tokens
    b = torch.tensor([[[4, 3, 9, 9]], [[1, 2, 3, 4]], [[-1, -1, -1, -1]]])  # duplicates count once
    m = overlap(a, b)
    # unit 0 of a vs b[0]: shares {3, 4} of min(4, |{4, 3, 9}| = 3) → 2/3; vs b[1]: identical → 1
    torch.testing.assert_close(m, torch.tensor([[2 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(UserError, match="differ"):
        overlap(a, b[:, :, :3])


@pytest.mark.parametrize("method", ["complete", "greedy"])
def test_identical_models_overlap_one_on_the_diagonal(model, method):
    units = neuron_units(model, "resid_post", 5)
    twin = tiny_model("llama")  # the same weights, a different module
    s = study(model, units, PREFIX, model_b=twin, method=method, top=4, greedy_tokens=2)
    assert s.overlap.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(s.overlap), torch.ones(3))
    within = study(model, units, PREFIX, method=method, top=4, greedy_tokens=2)
    torch.testing.assert_close(within.overlap, s.overlap)
    torch.testing.assert_close(within.overlap, within.overlap.t())
    assert within.summary == pytest.approx(float(torch.diagonal(within.overlap, 1).mean()))
    if method == "greedy":  # the top inputs are the tokens of each feature's greedy string
        g = greedy_search(model, units[1].objective(2), 2, PREFIX)
        assert within.tops_a[1, 2].tolist() == g.steps[-1].ids


def test_two_different_tiny_models(model):
    """Across models: A's layer i against B's layer j, with B of another depth; B unrelated to A."""
    cfg = CONFIGS["llama"]()
    cfg.num_hidden_layers = 2
    torch.manual_seed(7)
    b = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ua, ub = neuron_units(model, "resid_post", 8), neuron_units(b, "resid_post", 8)
    s = study(model, ua, PREFIX, model_b=b, units_b=ub, top=6)
    assert s.overlap.shape == (3, 2) and s.labels_b == ["layers.0.resid_post", "layers.1.resid_post"]
    # unrelated random weights: the shared top tokens are few (6 of 128 tokens; chance 6/128)
    assert float(s.overlap.mean()) < 0.3
    assert s.chance == pytest.approx(6 / 128)
    assert float(s.overlap.max()) < 1.0


def test_random_init_control_needs_no_download(model, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the control tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctrl = random_init_copy(model, seed=11)
    again = random_init_copy(model, seed=11)
    other = random_init_copy(model, seed=12)
    sd, sa, so = model.state_dict(), ctrl.state_dict(), other.state_dict()
    assert sd.keys() == sa.keys() and all(sd[k].shape == sa[k].shape for k in sd)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sa.items())          # seeded
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(sa[name], sd[name]) and not torch.equal(sa[name], so[name])  # fresh weights
    assert not ctrl.training and not any(p.requires_grad for p in ctrl.parameters())
    s = study(ctrl, neuron_units(ctrl, "resid_post", 5), PREFIX, top=4)
    assert s.overlap.shape == (3, 3) and torch.allclose(torch.diagonal(s.overlap), torch.ones(3))


def test_sae_units_by_index_and_by_decoder_match(model):
    torch.manual_seed(0)
    s0 = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=16, k=4)).eval()
    perm = torch.randperm(16)
    s1 = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=16, k=4)).eval()
    with torch.no_grad():  # s1 is s0 with its latents permuted
        s1.W_dec.copy_(s0.W_dec[perm])
        s1.enc.copy_(s0.enc[perm])
        s1.b_enc.copy_(s0.b_enc[perm])
    saes = [("a", s0, "layers.1.resid_post"), ("b", s1, "layers.1.resid_post")]
    by_index = sae_units(model, saes, 8)
    by_match = sae_units(model, saes, 8, match="decoder")
    inv = torch.argsort(perm)
    assert torch.equal(by_match[1].features, inv[:8])  # latent f of s0 is latent inv[f] of s1
    m = study(model, by_match, PREFIX, top=4).overlap
    assert float(m[0, 1]) == pytest.approx(1.0)  # the same SAE at the same layer: the same top inputs
    assert float(study(model, by_index, PREFIX, top=4).overlap[0, 1]) < 1.0
    with pytest.raises(UserError, match="out of range"):
        sae_units(model, saes, 17)


def test_bad_units(model):
    with pytest.raises(UserError, match="--features 33"):
        neuron_units(model, "resid_post", 33)
    with pytest.raises(UserError, match="--site"):
        neuron_units(model, "attn_hidden", 3)
    with pytest.raises(UserError, match="--top 200"):
        top_inputs_complete(model, [Unit("x", "layers.0.resid_post", torch.arange(2))], PREFIX, top=200)


@pytest.mark.smollm
def test_align_layers_cli(smollm2, tmp_path, capsys, monkeypatch):
    import csv
    import json

    from matplotlib.image import imread

    from analysis import align_layers_cli
    monkeypatch.setattr("collect.model.load_model", lambda spec, *a, **k: smollm2)
    out = tmp_path / "al"
    rc = align_layers_cli.main(["--layers", "0,1,2", "--features", "8", "--vocab", "256", "--top", "5",
                                "--out", str(out), "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("mean adjacent-layer overlap: model ") and "random-init control" in line
    for name in ("model", "control"):
        assert imread(out / f"overlap_{name}.png").shape[2] in (3, 4)
    rows = list(csv.DictReader(open(out / "overlap.csv", encoding="utf-8")))
    assert len(rows) == 9
    assert all(float(r["overlap_model"]) == 1.0 == float(r["overlap_control"]) for r in rows if r["i"] == r["j"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    adj = [float(r["overlap_model"]) for r in rows if int(r["j"]) == int(r["i"]) + 1]
    assert summary["model_mean_adjacent-layer_overlap"] == pytest.approx(sum(adj) / 2, abs=1e-5)
    assert summary["chance"] == pytest.approx(5 / 256)
    tops = json.loads((out / "tops.json").read_text(encoding="utf-8"))
    assert len(tops["model"]["a"]["layers.0.resid_post"]["ids"]) == 8
    with pytest.raises(UserError, match="--saes-b needs --model-b"):
        align_layers_cli.main(["--saes-b", "x"])
    # across models (here the same model twice): A × B, matched-depth summary 1
    rc = align_layers_cli.main(["--model-b", "smollm2-135m", "--layers", "0,1", "--features", "4", "--vocab", "64",
                                "--top", "3", "--control", "false", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 0 and capsys.readouterr().out.startswith("mean matched-depth overlap: model 1.000 (")
    assert not (tmp_path / "x" / "overlap_control.png").exists()


def test_models_must_share_a_tokenizer():
    from types import SimpleNamespace

    from analysis.align_layers_cli import _check_same_tokenizer
    tok = lambda v: SimpleNamespace(get_vocab=lambda: v)  # noqa: E731
    a = SimpleNamespace(spec="a", tokenizer=tok({"x": 0, "y": 1}))
    _check_same_tokenizer(a, SimpleNamespace(spec="b", tokenizer=tok({"x": 0, "y": 1})))
    with pytest.raises(UserError, match="different tokenizers"):
        _check_same_tokenizer(a, SimpleNamespace(spec="b", tokenizer=tok({"x": 1, "y": 0})))

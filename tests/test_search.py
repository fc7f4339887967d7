"""Vocabulary search (seed 004): complete search is really the max, greedy ≥ best single token."""
from __future__ import annotations

import pytest
import torch

from analysis.vocab_search import Objective, activation_of, complete_search, greedy_search, scan_vocab
from saeforge.errors import UserError
from sae.architectures import ArchConfig, build_sae
from sae.io import save_sae

HOOK = "layers.1.resid_post"


@pytest.mark.parametrize("kind", ["neuron", "latent"])
def test_complete_search_is_the_max(tiny_llama, tiny_topk_sae, kind):
    obj = Objective.for_neuron(HOOK, 7, 32) if kind == "neuron" else Objective.for_latent(tiny_topk_sae, 5, HOOK)
    prefix = [1]
    res = complete_search(tiny_llama, obj, prefix, top=5, batch=37)
    best = res.top[0]
    # re-run every single token from scratch (no cache, no batching): the best really is the max
    again = [activation_of(tiny_llama, obj, prefix + [t]) for t in range(128)]
    assert activation_of(tiny_llama, obj, prefix + best.ids) == pytest.approx((best.activation, best.pre), abs=1e-5)
    assert best.activation >= max(a for a, _ in again) - 1e-5
    if kind == "latent":
        assert best.activation > 0  # some token switches the latent on
    assert [c.activation for c in res.top] == sorted((c.activation for c in res.top), reverse=True)


def test_greedy_at_least_best_single_token(tiny_llama, tiny_topk_sae):
    obj = Objective.for_latent(tiny_topk_sae, 5, HOOK)
    comp = complete_search(tiny_llama, obj, [1], top=3)
    gr = greedy_search(tiny_llama, obj, 3, [1], top=3, batch=50)
    assert len(gr.steps) == 3 and [len(s.ids) for s in gr.steps] == [1, 2, 3]
    assert gr.steps[0].ids == comp.top[0].ids  # step one is the complete search
    assert gr.best.activation >= comp.top[0].activation
    # every step's activation is what a fresh forward of that string gives, and it is the argmax of its step
    for s in gr.steps:
        assert activation_of(tiny_llama, obj, [1] + s.ids)[0] == pytest.approx(s.activation, abs=1e-5)
    act, _ = scan_vocab(tiny_llama, obj, [1] + gr.steps[1].ids, use_cache=False)
    assert gr.steps[2].activation == pytest.approx(float(act.max()), abs=1e-5)


def test_cache_equals_recompute(tiny_llama):
    obj = Objective.for_neuron(HOOK, 2, 32)
    a, _ = scan_vocab(tiny_llama, obj, [1, 9, 4], batch=40, use_cache=True)
    b, _ = scan_vocab(tiny_llama, obj, [1, 9, 4], batch=40, use_cache=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_out_of_range(tiny_topk_sae):
    with pytest.raises(UserError, match="out of range"):
        Objective.for_latent(tiny_topk_sae, 24, HOOK)
    with pytest.raises(UserError, match="out of range"):
        Objective.for_neuron(HOOK, 32, 32)


@pytest.mark.smollm
def test_search_cli(smollm2, tmp_path, capsys, monkeypatch):
    from analysis import search_cli
    monkeypatch.setattr(search_cli, "load_model", lambda spec, *a, **k: smollm2)
    rc = search_cli.main(["--hook", "layers.0.resid_post", "--neuron", "5", "--vocab", "1500", "--greedy-tokens", "2",
                          "--top", "3", "--out", str(tmp_path / "s.json"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "complete search over 1500 tokens" in out and "best:" in out
    s = build_sae(ArchConfig(arch="topk", d_in=576, d_sae=16, k=4))
    d = save_sae(s, tmp_path / "sae", meta={"hook_point": "layers.0.resid_post", "model": "smollm2-135m",
                                            "model_hash": smollm2.weights_hash})
    with pytest.raises(UserError, match="--latent 16 is out of range"):
        search_cli.main(["--sae", str(d), "--latent", "16"])
    other = save_sae(s, tmp_path / "other", meta={"hook_point": "layers.0.resid_post", "model_hash": "f" * 32})
    with pytest.raises(UserError, match="trained on model"):
        search_cli.main(["--sae", str(other), "--latent", "1", "--vocab", "10"])


@pytest.mark.smollm
def test_search_cli_gradient(smollm2, tmp_path, capsys, monkeypatch):
    """An MLP neuron: complete, greedy and both gradient priors; what is reported is what the tokens give."""
    import json
    from analysis import search_cli
    from analysis.objectives import Objective
    monkeypatch.setattr(search_cli, "load_model", lambda spec, *a, **k: smollm2)
    out = tmp_path / "g.json"
    rc = search_cli.main(["--hook", "layers.1.mlp_hidden", "--neuron", "9", "--vocab", "400", "--greedy-tokens", "2",
                          "--gradient", "--prior", "both", "--steps", "6", "--restarts", "2", "--eval-every", "3",
                          "--top", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gradient search (softmax prior" in text and "gradient search (embed prior" in text
    assert "agreement" in text and "complete-search ranks" in text
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert [g["prior"] for g in doc["gradient"]] == ["softmax", "embed"]
    obj = Objective.for_neuron("layers.1.mlp_hidden", 9, 1536)
    for g in doc["gradient"]:
        best = g["best"]
        assert len(best["ids"]) == 2 and all(t < 400 for t in best["ids"])
        assert activation_of(smollm2.model, obj, doc["prefix"] + best["ids"])[0] == pytest.approx(best["activation"], abs=1e-4)
        assert g["agreement"]["greedy_activation"] == pytest.approx(doc["greedy"][1]["activation"], abs=1e-4)
    with pytest.raises(UserError, match="give one feature"):
        search_cli.main(["--hook", "layers.1.resid_post"])
    with pytest.raises(UserError, match="out of range"):
        search_cli.main(["--hook", "layers.1.mlp_hidden", "--neuron", "1536", "--vocab", "10"])


def test_cache_problems_are_loud(tiny_llama, monkeypatch, caplog):
    """Issue 12: the KV-cache set-up used to swallow every exception and silently recompute the prefix."""
    import logging

    import transformers

    from analysis import vocab_search
    obj = Objective.for_neuron(HOOK, 2, 32)
    expected, _ = scan_vocab(tiny_llama, obj, [1, 9], use_cache=False)

    class BrokenCache(transformers.DynamicCache):
        def __init__(self, *a, **k):
            raise RuntimeError("broken cache")
    monkeypatch.setattr(transformers, "DynamicCache", BrokenCache)
    with pytest.raises(RuntimeError, match="broken cache"):
        scan_vocab(tiny_llama, obj, [1, 9], use_cache=True)
    monkeypatch.undo()
    # a forward that takes no cache: a warning saying so, and the same numbers by recomputing
    monkeypatch.setattr(vocab_search, "cache_kwarg", lambda m: None)
    with caplog.at_level(logging.WARNING, logger="analysis.vocab_search"):
        got, _ = scan_vocab(tiny_llama, obj, [1, 9], use_cache=True)
    assert "takes no KV cache" in caplog.text
    torch.testing.assert_close(got, expected)


def test_cache_kwarg_matches_this_transformers(tiny_llama):
    import inspect

    from analysis.vocab_search import cache_kwarg
    assert cache_kwarg(tiny_llama) in inspect.signature(tiny_llama.forward).parameters

"""Gradient search on soft inputs (seed 004) and the objectives it shares with vocabulary search."""
from __future__ import annotations

import pytest
import torch

from analysis.directions import SteeringVector
from analysis.grad_search import gradient_search
from analysis.objectives import Objective, direction_objective, mlp_output_projection, read_width, reading
from analysis.steer_files import save_safetensors
from analysis.vocab_search import activation_of, complete_search, scan_vocab
from saeforge.errors import UserError
from tests.tiny_models import tiny_model

HOOK = "layers.1.resid_post"
PREFIX = [1]


def _objectives(tiny_llama, tiny_topk_sae):
    torch.manual_seed(5)
    return {
        "neuron": Objective.for_neuron(HOOK, 7, 32),
        "mlp": Objective.for_neuron("layers.1.mlp_hidden", 11, read_width(tiny_llama, "layers.1.mlp_hidden")),
        "latent": Objective.for_latent(tiny_topk_sae, 5, HOOK),
        "direction": Objective.for_direction(torch.randn(32), HOOK),
    }


@pytest.mark.parametrize("prior", ["softmax", "embed"])
@pytest.mark.parametrize("kind", ["neuron", "mlp", "latent", "direction"])
def test_one_token_between_random_token_and_complete_max(tiny_llama, tiny_topk_sae, prior, kind):
    obj = _objectives(tiny_llama, tiny_topk_sae)[kind]
    act, key = scan_vocab(tiny_llama, obj, PREFIX)
    res = gradient_search(tiny_llama, obj, 1, PREFIX, prior=prior, steps=40, restarts=4, seed=0, eval_every=5)
    best = res.best
    # what is reported is what the tokens really produce, run from scratch
    assert activation_of(tiny_llama, obj, PREFIX + best.ids) == pytest.approx((best.activation, best.pre), abs=1e-5)
    # never above the exhaustive maximum over single tokens, and at least as good as a random token
    assert best.activation <= float(act.max()) + 1e-5
    random_token = int(torch.randint(act.numel(), (1,), generator=torch.Generator().manual_seed(1)))
    assert (best.activation, best.pre) >= (float(act[random_token]), float(key[random_token]))
    # in fact better than most tokens: the ascent found a high-ranking token
    assert (act > best.activation).sum() < act.numel() // 4
    assert len(res.runs) == 4 and all(torch.isfinite(torch.tensor(r.soft)) for r in res.runs)


def test_seeded_and_batched_restarts(tiny_llama):
    obj = Objective.for_neuron(HOOK, 3, 32)
    a = gradient_search(tiny_llama, obj, 3, PREFIX, steps=15, restarts=3, seed=4)
    b = gradient_search(tiny_llama, obj, 3, PREFIX, steps=15, restarts=3, seed=4)
    assert [r.ids for r in a.runs] == [r.ids for r in b.runs] and [r.soft for r in a.runs] == [r.soft for r in b.runs]
    assert all(len(r.ids) == 3 for r in a.runs) and len(a.history) == 15


def test_softmax_prior_ends_near_one_hot(tiny_llama):
    """With a low final temperature the soft input is a token: its objective equals the argmax tokens'."""
    obj = Objective.for_neuron(HOOK, 3, 32)
    res = gradient_search(tiny_llama, obj, 2, PREFIX, steps=60, restarts=2, temp_end=1e-3, eval_every=0, lr=0.3)
    for r in res.runs:
        assert r.step == 59  # only the last discretisation was run
        assert r.soft == pytest.approx(r.activation, abs=1e-3)


def test_all_positions_readout(tiny_llama):
    obj = Objective.for_neuron(HOOK, 3, 32)
    res = gradient_search(tiny_llama, obj, 3, PREFIX, steps=20, restarts=2, positions="all")
    for r in res.runs:
        mean_act = activation_of(tiny_llama, obj, PREFIX + r.ids, from_pos=len(PREFIX))[0]
        assert r.activation == pytest.approx(mean_act, abs=1e-5)
        assert r.activation != pytest.approx(activation_of(tiny_llama, obj, PREFIX + r.ids)[0], abs=1e-6)


def test_bad_arguments(tiny_llama):
    obj = Objective.for_neuron(HOOK, 3, 32)
    with pytest.raises(UserError, match="--prior"):
        gradient_search(tiny_llama, obj, 1, PREFIX, prior="gumbel")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="must be ≥ 1"):
        gradient_search(tiny_llama, obj, 0, PREFIX)
    with pytest.raises(UserError, match="--vocab 999"):
        scan_vocab(tiny_llama, obj, PREFIX, vocab=999)


@pytest.mark.parametrize("arch,proj", [("llama", "model.layers.1.mlp.down_proj"), ("gpt2", "transformer.h.1.mlp.c_proj"),
                                       ("gpt_neox", "gpt_neox.layers.1.mlp.dense_4h_to_h")])
def test_mlp_hidden_is_the_output_projection_input(arch, proj):
    m = tiny_model(arch)
    assert mlp_output_projection(m, 1) == proj
    ids = torch.tensor([[1, 5, 9]])
    with reading(m, ["layers.1.mlp_hidden", "layers.1.mlp_out"]) as r:
        acts = r.forward(m, input_ids=ids, use_cache=False)
    hidden = acts["layers.1.mlp_hidden"]
    assert hidden.shape[-1] == read_width(m, "layers.-2.mlp_hidden") > 32
    # the MLP's output is its output projection applied to the hidden activations
    out = m.get_submodule(proj)(hidden)
    torch.testing.assert_close(out, acts["layers.1.mlp_out"], rtol=1e-5, atol=1e-6)


def test_direction_file_objective(tiny_llama, tmp_path):
    torch.manual_seed(2)
    v = torch.randn(32)
    path = save_safetensors(SteeringVector({HOOK: v * 5}, {"source": "test"}), tmp_path / "d.safetensors")
    obj = direction_objective(str(path), tiny_llama)
    assert obj.hook == HOOK and "test" in obj.name
    best = complete_search(tiny_llama, obj, PREFIX, top=1).top[0]
    with reading(tiny_llama, [HOOK]) as r:
        h = r.forward(tiny_llama, input_ids=torch.tensor([PREFIX + best.ids]), use_cache=False)[HOOK][0, -1]
    assert best.activation == pytest.approx(float(h @ (v / v.norm())), abs=1e-5)  # the projection on the unit vector
    two = save_safetensors(SteeringVector({HOOK: v, "layers.0.resid_post": v.clone()}), tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="pick one with --hook"):
        direction_objective(str(two), tiny_llama)
    assert direction_objective(str(two), tiny_llama, "layers.0.resid_post").hook == "layers.0.resid_post"
    per_pos = save_safetensors(SteeringVector({HOOK: torch.randn(3, 32)}), tmp_path / "pp.safetensors")
    with pytest.raises(UserError, match="per-position"):
        direction_objective(str(per_pos), tiny_llama)
    wide = save_safetensors(SteeringVector({HOOK: torch.randn(48)}), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="width 48"):
        direction_objective(str(wide), tiny_llama)


def test_readings_do_not_nest(tiny_llama):
    with reading(tiny_llama, [HOOK]):
        with pytest.raises(RuntimeError, match="do not nest"):
            with reading(tiny_llama, [HOOK]):
                pass

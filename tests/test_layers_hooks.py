"""Layer discovery and hooks on tiny random models of many architectures."""
from __future__ import annotations

import pytest
import torch

from saeforge.errors import UserError
from collect.hooks import add_vector, capture, forward_to, hooks, project_out, replace_with
from collect.layers import discover_layout, hook_point_names, resolve_hook_point
from tests.tiny_models import CONFIGS, tiny_model

ARCHS = sorted(CONFIGS)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def _ids(n: int = 2, t: int = 10) -> torch.Tensor:
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(1))


def test_layout_matches_config(model):
    lay = discover_layout(model)
    assert lay.n_layers == model.config.num_hidden_layers
    assert len(lay.attn) == lay.n_layers and len(lay.mlp) == lay.n_layers
    assert model.get_submodule(lay.embed) is model.get_input_embeddings()


def test_final_norm_is_what_the_unembedding_reads(model):
    """The module called final_norm is the one whose output the LM head turns into the logits."""
    ids = _ids()
    with capture(model, "final_norm") as acts, torch.no_grad():
        logits = model(input_ids=ids).logits
        again = model.get_output_embeddings()(acts["final_norm"])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        again = torch.tanh(again / cap) * cap
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)


def test_every_hook_point_resolves_and_fires(model):
    lay = discover_layout(model)
    names = hook_point_names(lay)
    assert len(names) == 2 + 4 * lay.n_layers
    with capture(model, names) as acts, torch.no_grad():
        model(input_ids=_ids())
    assert set(acts) == set(names)
    for name, a in acts.items():
        assert a.shape[:2] == (2, 10), name


def test_resid_matches_hidden_states(model):
    ids = _ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    points = [f"layers.{i}.resid_pre" for i in range(n)] + [f"layers.{i}.resid_post" for i in range(n - 1)]
    with capture(model, points) as acts, torch.no_grad():
        model(input_ids=ids)
    for i in range(n):
        torch.testing.assert_close(acts[f"layers.{i}.resid_pre"], hs[i], rtol=0, atol=0)
    for i in range(n - 1):
        torch.testing.assert_close(acts[f"layers.{i}.resid_post"], hs[i + 1], rtol=0, atol=0)


def test_forward_stops_after_deepest_hook(model):
    lay = discover_layout(model)
    entered: list[int] = []
    done: list[int] = []
    handles = [model.get_submodule(b).register_forward_pre_hook(lambda m, a, i=i: entered.append(i))
               for i, b in enumerate(lay.blocks)]
    handles += [model.get_submodule(b).register_forward_hook(lambda m, a, o, i=i: done.append(i))
                for i, b in enumerate(lay.blocks)]
    try:
        out = forward_to(model, _ids(), ["layers.0.resid_post", "layers.1.mlp_out"])
        assert entered == [0, 1] and done == [0]
        entered.clear(), done.clear()
        out2 = forward_to(model, _ids(), "layers.1.resid_pre")
        assert done == [0] and 2 not in entered
    finally:
        for h in handles:
            h.remove()
    assert set(out) == {"layers.0.resid_post", "layers.1.mlp_out"}
    assert "layers.1.resid_pre" in out2


def test_negative_index_and_errors(model):
    lay = discover_layout(model)
    n = lay.n_layers
    assert resolve_hook_point(lay, "layers.-1.resid_post").name == f"layers.{n - 1}.resid_post"
    with pytest.raises(UserError, match="out of range"):
        resolve_hook_point(lay, f"layers.{n}.resid_post")
    with pytest.raises(UserError, match="unknown hook point"):
        resolve_hook_point(lay, "layers.0.resid_middle")


def test_edit_hooks_change_output_and_are_removed(model):
    ids = _ids()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    d = model.config.hidden_size
    v = torch.randn(d)
    with hooks(model, {"layers.0.resid_post": add_vector(v, 5.0)}), torch.no_grad():
        steered = model(input_ids=ids).logits
    assert not torch.allclose(clean, steered)
    with torch.no_grad():
        again = model(input_ids=ids).logits
    torch.testing.assert_close(clean, again, rtol=0, atol=0)
    # adding to resid_post[0] is the same as adding to resid_pre[1]
    with hooks(model, {"layers.1.resid_pre": add_vector(v, 5.0)}), torch.no_grad():
        steered_pre = model(input_ids=ids).logits
    torch.testing.assert_close(steered, steered_pre, rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_error(model):
    def boom(x, call):
        raise RuntimeError("boom")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, {"layers.0.mlp_out": boom}), torch.no_grad():
            model(input_ids=_ids())
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == after


def test_project_out_and_replace(model):
    d = model.config.hidden_size
    direction = torch.randn(d)
    with hooks(model, {"layers.0.resid_post": project_out(direction)}), \
            capture(model, ["layers.1.resid_pre"]) as acts, torch.no_grad():
        model(input_ids=_ids())
    proj = acts["layers.1.resid_pre"] @ (direction / direction.norm())
    assert proj.abs().max() < 1e-4
    zeros = torch.zeros(2, 10, d)
    with hooks(model, {"layers.1.resid_pre": replace_with(zeros)}), \
            capture(model, ["layers.1.resid_pre"]) as acts2, torch.no_grad():
        model(input_ids=_ids())
    # capture registered after the edit on the same module sees the edited input
    assert acts2["layers.1.resid_pre"].abs().max() == 0


def test_aliases_of_one_point_are_refused_not_shifted(model):
    """layers.-1 and layers.{n-1} are one point: installing both must fail, never run g at layer 3 (bug 2)."""
    n = model.config.num_hidden_layers
    calls: list[str] = []
    fns = {"layers.-1.resid_post": lambda x, c: calls.append("f"), f"layers.{n - 1}.resid_post": lambda x, c: calls.append("g"),
           "layers.0.resid_post": lambda x, c: calls.append("h")}
    with pytest.raises(UserError, match="are the same point"):
        with hooks(model, fns):
            pass
    distinct = {"layers.-1.resid_post": lambda x, c: calls.append("last"), "layers.0.resid_post": lambda x, c: calls.append("first")}
    with hooks(model, distinct) as points, torch.no_grad():
        model(input_ids=_ids())
    assert [p.name for p in points] == [f"layers.{n - 1}.resid_post", "layers.0.resid_post"]
    assert calls == ["first", "last"]

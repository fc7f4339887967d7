"""Layer discovery and hooks on tiny random models of many architectures."""
from __future__ import annotations

import pytest
import torch

from saeforge.errors import UserError
from collect.hooks import add_vector, capture, forward_to, hooks, project_out, replace_with
from collect.layers import discover_layout, hook_point_names, resolve_hook_point
from tests.tiny_models import CONFIGS, tiny_model

ARCHS = sorted(CONFIGS)

# The hand-written forward of each block around its MLP (what transformers' modeling files do):
# (how the block is wired, the norm the MLP reads, the norm applied to attention's output before the add,
#  the norm applied to the MLP's output before the add)
WIRING = {
    "gpt2": ("sequential", "ln_2", None, None),
    "llama": ("sequential", "post_attention_layernorm", None, None),
    "mistral": ("sequential", "post_attention_layernorm", None, None),
    "qwen2": ("sequential", "post_attention_layernorm", None, None),
    "qwen3": ("sequential", "post_attention_layernorm", None, None),
    "phi3": ("sequential", "post_attention_layernorm", None, None),
    "gemma2": ("sequential", "pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt_neox": ("parallel", "post_attention_layernorm", None, None),  # use_parallel_residual=True by default
    "falcon": ("parallel", "input_layernorm", None, None),             # parallel_attn=True by default
    "gptj": ("parallel", "ln_1", None, None),
}


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
    per_block = 6 if lay.mlp_norm else 5  # resid_pre, attn_out, [resid_mid], mlp_in, mlp_out, resid_post
    assert len(names) == 2 + per_block * lay.n_layers
    assert bool(lay.mlp_norm) != lay.parallel, (lay.mlp_norm, lay.parallel)
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


def test_mlp_in_and_resid_mid_match_a_hand_written_forward(model):
    """mlp_in is what the MLP receives (after its norm); resid_mid is the residual between attention and MLP,
    checked against each architecture's own wiring; parallel blocks refuse resid_mid with one line."""
    arch = model.config.model_type
    wiring, mlp_norm, attn_post, mlp_post = WIRING[arch]
    lay = discover_layout(model)
    n = lay.n_layers
    sites = ["resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post"] + (["resid_mid"] if wiring == "sequential" else [])
    points = [f"layers.{i}.{s}" for i in range(n) for s in sites]
    with capture(model, points) as acts, torch.no_grad():
        model(input_ids=_ids())
    for i in range(n):
        a = {s: acts[f"layers.{i}.{s}"] for s in sites}
        block = model.get_submodule(lay.blocks[i])
        norm = lambda name, x: block.get_submodule(name)(x)  # noqa: E731
        with torch.no_grad():
            torch.testing.assert_close(block.get_submodule(lay.mlp[i].rsplit(".", 1)[-1])(a["mlp_in"]), a["mlp_out"])
            if wiring == "parallel":
                torch.testing.assert_close(a["mlp_in"], norm(mlp_norm, a["resid_pre"]))
                continue
            attn = norm(attn_post, a["attn_out"]) if attn_post else a["attn_out"]
            torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + attn)
            torch.testing.assert_close(a["mlp_in"], norm(mlp_norm, a["resid_mid"]))
            mlp = norm(mlp_post, a["mlp_out"]) if mlp_post else a["mlp_out"]
            torch.testing.assert_close(a["resid_post"], a["resid_mid"] + mlp)
    if wiring == "parallel":
        with pytest.raises(UserError, match="in parallel") as e:
            resolve_hook_point(lay, "layers.1.resid_mid")
        assert "layers.1.mlp_in" in str(e.value) and "\n" not in str(e.value)


def test_editing_resid_mid_reaches_the_residual_and_mlp_in_only_the_mlp(model):
    """An edit at resid_mid is carried by the residual stream too (adding v there = adding v to attention's
    output where that is added as it is); an edit at mlp_in changes what the MLP reads and nothing else."""
    arch = model.config.model_type
    wiring, _, attn_post, _ = WIRING[arch]
    ids = _ids()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with hooks(model, {"layers.1.mlp_in": add_vector(v, 3.0)}):
            at_mlp_in = model(input_ids=ids).logits
        with hooks(model, {"layers.1.mlp_in": add_vector(v, 3.0)}):  # capture, installed after, sees the edit
            with capture(model, ["layers.1.mlp_in", "layers.1.mlp_out"]) as acts:
                model(input_ids=ids)
    assert not torch.allclose(clean, at_mlp_in)
    lay = discover_layout(model)
    mlp = model.get_submodule(lay.mlp[1])
    with torch.no_grad():
        torch.testing.assert_close(acts["layers.1.mlp_out"], mlp(acts["layers.1.mlp_in"]))
    if wiring == "parallel" or attn_post:
        return
    with torch.no_grad():
        with hooks(model, {"layers.1.resid_mid": add_vector(v, 3.0)}):
            at_mid = model(input_ids=ids).logits
        with hooks(model, {"layers.1.attn_out": add_vector(v, 3.0)}):
            at_attn = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    torch.testing.assert_close(at_mid, at_attn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, clean, rtol=0, atol=0)


def test_output_module_outputs_the_hook_points_tensor(model):
    """What the store records as `hook_outputs` (for SAELens export): the named module's output is the
    captured tensor of mlp_in, resid_pre of block 1 and the module-output sites; resid_mid is None, and
    so is a parallel block's mlp_in (its norm is not located: export refuses rather than name a wrong one)."""
    from collect.layers import output_module
    layout = discover_layout(model)
    ids = _ids()
    points = ["layers.1.resid_pre", "layers.1.mlp_out", "layers.1.resid_post"]
    if layout.parallel:
        assert output_module(layout, resolve_hook_point(layout, "layers.1.mlp_in")) is None
    else:
        points.append("layers.1.mlp_in")
    with capture(model, points, layout=layout) as got:
        model(ids)
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for p in points:
        name = output_module(layout, resolve_hook_point(layout, p))
        assert name is not None, p
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, o, p=p: outs.__setitem__(p, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    for p in points:
        torch.testing.assert_close(outs[p], got[p], msg=p)
    if not layout.parallel:
        assert output_module(layout, resolve_hook_point(layout, "layers.1.resid_mid")) is None
    assert output_module(layout, resolve_hook_point(layout, "layers.0.resid_pre")) is None

"""Applying steering on tiny random models: position masks under generate with a KV cache and left
padding (position_ids for Llama, cache_position for GPT-2), ablation, SAE clamping, per-position rows."""
from __future__ import annotations

import pytest
import torch

from analysis.directions import SteeringVector, from_sae, load_sae_latent
from analysis.steer_apply import random_like, steer
from collect.hooks import hooks
from saeforge.errors import UserError
from tests.tiny_models import tiny_model

POINT = "layers.1.resid_post"


def _record(store: list):
    def fn(x, call):
        store.append(x.detach().clone())
    return fn


def _left_padded_batch():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


@torch.no_grad()
def _generate_recording(model, ids, mask, sv=None, **kw):
    steps: list[torch.Tensor] = []
    ctx = steer(model, sv, **kw) if sv is not None else None
    if ctx:
        ctx.__enter__()
    try:
        with hooks(model, {POINT: _record(steps)}):   # registered after the steering hook: sees the edit
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    return out, steps


@torch.no_grad()
def _reference(model, seq, mask):
    """The unsteered activation at POINT over the final sequence, positions as generate builds them."""
    full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    kw = {"position_ids": (full_mask.cumsum(-1) - 1).clamp_min(0)}   # as generate builds them
    got = []
    with hooks(model, {POINT: _record(got)}):
        model(input_ids=seq, attention_mask=full_mask, use_cache=False, **kw)
    return got[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["generated", "prompt", "all"])
def test_position_masks_under_kv_cache_and_left_padding(arch, positions):
    model = tiny_model(arch)
    d = model.config.hidden_size if arch == "llama" else model.config.n_embd
    vec = torch.randn(d, generator=torch.Generator().manual_seed(1))
    sv = SteeringVector({POINT: vec})
    ids, mask = _left_padded_batch()
    T = ids.shape[1]
    base, _ = _generate_recording(model, ids, mask)
    out, steps = _generate_recording(model, ids, mask, sv, coeff=3.0, positions=positions)
    ref = _reference(model, out.sequences, mask)
    assert len(steps) == 4 and steps[0].shape[1] == T and all(s.shape[1] == 1 for s in steps[1:])
    real = mask.bool()
    # prefill: real prompt positions get the vector only for "prompt"/"all"
    want_prompt = ref[:, :T] + (3.0 * vec if positions in ("prompt", "all") else 0)
    torch.testing.assert_close(steps[0][real], want_prompt[real], atol=1e-4, rtol=1e-4)
    # decode steps (KV cache, one token each): the vector only for "generated"/"all"
    for k, s in enumerate(steps[1:]):
        want = ref[:, T + k] + (3.0 * vec if positions in ("generated", "all") else 0)
        torch.testing.assert_close(s[:, 0], want, atol=1e-4, rtol=1e-4)
    # "generated" leaves the prompt's logits alone (first new token's logits identical), changes later ones
    if positions == "generated":
        torch.testing.assert_close(out.logits[0], base.logits[0])
        assert not torch.allclose(out.logits[-1], base.logits[-1], atol=1e-3)
    else:
        assert not torch.allclose(out.logits[0], base.logits[0], atol=1e-3)


def test_explicit_prompt_lengths_split_a_teacher_forced_batch_per_row():
    model = tiny_model("llama")
    vec = torch.ones(32)
    ids = torch.arange(1, 13).reshape(2, 6)
    rows = []
    with steer(model, {POINT: vec}, coeff=1.0, positions="generated", prompt_lengths=[2, 4]):
        with hooks(model, {POINT: _record(rows)}):
            model(input_ids=ids, use_cache=False)
    plain = []
    with hooks(model, {POINT: _record(plain)}):
        model(input_ids=ids, use_cache=False)
    diff = (rows[0] - plain[0]).mean(-1)
    torch.testing.assert_close(diff, torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1.]]), atol=1e-5, rtol=0)


def test_ablate_removes_the_projection_and_keeps_the_rest():
    model = tiny_model("llama")
    d = torch.randn(32, generator=torch.Generator().manual_seed(2))
    ids = torch.arange(1, 9).unsqueeze(0)
    edited, plain = [], []
    with steer(model, {POINT: d}, op="ablate"):
        with hooks(model, {POINT: _record(edited)}):
            model(input_ids=ids, use_cache=False)
    with hooks(model, {POINT: _record(plain)}):
        model(input_ids=ids, use_cache=False)
    u = d / d.norm()
    assert (plain[0] @ u).abs().max() > 1e-2
    assert (edited[0] @ u).abs().max() < 1e-7
    torch.testing.assert_close(edited[0], plain[0] - (plain[0] @ u).unsqueeze(-1) * u)


def _tiny_sae(path, arch="relu", k=3, d_in=32, d_sae=8, hook_point=POINT):
    """A real SAE directory (sae.io.save_sae) with orthonormal decoder rows (W_enc = W_decᵀ), b_enc 0.5."""
    from sae.architectures import ArchConfig, build_sae
    from sae.io import save_sae
    sae = build_sae(ArchConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k))
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.enc.copy_(q.T)
        sae.b_enc.fill_(0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)     # the saved inference threshold: more than k latents pass it
        if arch == "jumprelu":
            sae.log_threshold.fill_(float(torch.tensor(0.3).log()))
    return save_sae(sae, path, meta={"hook_point": hook_point, "model": "tiny-llama"})


ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_reads_with_the_sae_modules_own_rule(tmp_path, arch):
    """Regression (issue 12, bug 1): a BatchTopK latent was read with the TopK rule, not its threshold."""
    from sae.io import load_sae
    path = _tiny_sae(tmp_path / "sae", arch=arch, k=2)
    sae = load_sae(path)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    dense = sae.encode(x)
    for i in range(8):
        latent, _ = load_sae_latent(path, i)
        torch.testing.assert_close(latent.encode(x), dense[:, i])
    if arch == "batchtopk":   # the test tells the rules apart: the threshold admits latents TopK-2 drops
        assert ((dense > 0).sum(-1) > 2).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_clamp_sets_the_latent_to_the_value(tmp_path, arch):
    model = tiny_model("llama")
    sae = _tiny_sae(tmp_path / "sae", arch=arch, k=3)
    latent, _ = load_sae_latent(sae, 2)
    sv = from_sae(model, sae, 2)
    assert sv.points == [POINT]
    torch.testing.assert_close(sv.directions[POINT], latent.d_dec)
    ids = torch.arange(1, 9).unsqueeze(0)
    got, plain = [], []
    with steer(model, sv, coeff=7.0, op="clamp", latent=latent):
        with hooks(model, {POINT: _record(got)}):
            model(input_ids=ids, use_cache=False)
    with hooks(model, {POINT: _record(plain)}):
        model(input_ids=ids, use_cache=False)
    a = latent.encode(plain[0])
    torch.testing.assert_close(got[0], plain[0] + (7.0 - a).unsqueeze(-1) * latent.d_dec, atol=1e-5, rtol=1e-5)
    # where the latent was on, the clamped activation reads back as the value (orthonormal decoder, W_enc = W_decᵀ)
    on = a > 0
    assert on.any()
    torch.testing.assert_close(latent.encode(got[0])[on], torch.full((int(on.sum()),), 7.0), atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="out of range"):
        from_sae(model, sae, 99)


def test_per_position_rows_land_on_their_absolute_positions_under_kv_cache():
    model = tiny_model("llama")
    rows = torch.zeros(3, 32)
    rows[1, 0], rows[2, 1] = 1.0, 2.0               # row p is added at position p only
    ids = torch.tensor([[5, 6, 7, 8]])
    steps = []
    with steer(model, {POINT: rows}, coeff=1.0):
        with hooks(model, {POINT: _record(steps)}):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    plain = []
    with hooks(model, {POINT: _record(plain)}):
        model(input_ids=ids, use_cache=False)
    diff = steps[0][0] - plain[0][0]
    torch.testing.assert_close(diff[:, :2], torch.tensor([[0, 0], [1, 0], [0, 2], [0, 0.]]), atol=1e-5, rtol=0)
    assert diff[:, 2:].abs().max() < 1e-5


def test_random_control_has_equal_norm_and_fixed_seed():
    sv = SteeringVector({POINT: torch.randn(32)})
    a, b = random_like(sv, 0), random_like(sv, 0)
    torch.testing.assert_close(a.directions[POINT].norm(), sv.directions[POINT].norm())
    assert torch.equal(a.directions[POINT], b.directions[POINT])


def test_bad_operator_and_positions_are_user_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="--op 'scale'"):
        with steer(model, {POINT: torch.ones(32)}, op="scale"):
            pass
    with pytest.raises(UserError, match="--positions 'later'"):
        with steer(model, {POINT: torch.ones(32)}, positions="later"):
            pass
    with pytest.raises(UserError, match="out of range"):
        with steer(model, {"layers.9.resid_post": torch.ones(32)}):
            pass


def test_skip_first_spares_the_leading_positions():
    model = tiny_model("llama")
    ids = torch.arange(1, 6).unsqueeze(0)
    got, plain = [], []
    with steer(model, {POINT: torch.ones(32)}, coeff=2.0, skip_first=1), hooks(model, {POINT: _record(got)}):
        model(input_ids=ids, use_cache=False)
    with hooks(model, {POINT: _record(plain)}):
        model(input_ids=ids, use_cache=False)
    torch.testing.assert_close((got[0] - plain[0]).mean(-1), torch.tensor([[0, 2, 2, 2, 2.]]), atol=1e-5, rtol=0)

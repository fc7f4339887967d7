"""Steering the packaged SmolLM2-135M: a Love−Hate direction makes positive words likelier after
"I hate you because" (more than a random direction of equal norm does), ablation removes the
projection, position masks hold under generate with a KV cache on a left-padded batch, and the CLI
writes every file and prints the sweep table."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.directions import actadd
from analysis.steer_apply import steer
from analysis.steer_eval import NEUTRAL, encode, generate, sweep, target_ids
from analysis.steer_sampling import Sampling
from collect.hooks import hooks
from saeforge.errors import run_cli

SOURCE, INJECT, COEFF = "layers.4.resid_post", "layers.6.resid_post", 4.0


@pytest.fixture(scope="module")
def love(smollm2):
    return actadd(smollm2.model, smollm2.tokenizer, "Love", "Hate", SOURCE, [INJECT], read="last")


def test_love_minus_hate_raises_positive_words_more_than_random(smollm2, love):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = encode(tok, "I hate you because")
    cont = generate(model, tok, ids, max_new_tokens=6, sampling=Sampling(temperature=0))
    rows = sweep(model, tok, love, [COEFF], ids, target_ids(tok, " love, happy, great"), NEUTRAL[:1], cont=cont)
    r = rows[0]
    assert r.dlogp > 0.5, r
    assert r.dlogp > r.dlogp_random + 0.5, r


def _record(store):
    def fn(x, call):
        store.append(x.detach().clone())
    return fn


def test_ablation_removes_the_projection_on_smollm2(smollm2, love):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("I hate you because you lied to me.", return_tensors="pt").input_ids
    u = love.directions[INJECT] / love.directions[INJECT].norm()
    edited, plain = [], []
    with steer(model, love, op="ablate"), hooks(model, {INJECT: _record(edited)}), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    with hooks(model, {INJECT: _record(plain)}), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert (plain[0] @ u).abs().max() > 1.0
    assert (edited[0] @ u).abs().max() < 1e-3
    torch.testing.assert_close(edited[0], plain[0] - (plain[0] @ u).unsqueeze(-1) * u, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_position_masks_on_a_left_padded_batch_with_kv_cache(smollm2, love, positions):
    model, tok = smollm2.model, smollm2.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        batch = tok(["I hate you because", "Well,"], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side            # the tokenizer is shared by the whole session
    ids, mask = batch.input_ids, batch.attention_mask
    assert mask[1, 0] == 0                      # the second row really is left-padded
    T, vec = ids.shape[1], COEFF * love.directions[INJECT]
    steps = []
    with torch.no_grad(), steer(model, love, coeff=COEFF, positions=positions), hooks(model, {INJECT: _record(steps)}):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    full_mask = torch.cat([mask, torch.ones(2, out.shape[1] - T, dtype=mask.dtype)], 1)
    ref = []
    with torch.no_grad(), hooks(model, {INJECT: _record(ref)}):
        model(input_ids=out, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0),
              use_cache=False)
    ref = ref[0]
    real = mask.bool()
    on_prompt, on_new = (positions == "prompt"), (positions == "generated")
    torch.testing.assert_close(steps[0][real], (ref[:, :T] + (vec if on_prompt else 0))[real], atol=2e-3, rtol=1e-4)
    for k, s in enumerate(steps[1:]):
        torch.testing.assert_close(s[:, 0], ref[:, T + k] + (vec if on_new else 0), atol=2e-3, rtol=1e-4)


def test_cli_writes_files_and_prints_side_by_side_and_sweep(smollm2, tmp_path, monkeypatch, capsys):
    import gguf

    import collect.model
    from analysis.steer_cli import main
    from analysis.steer_files import load_safetensors
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    out = tmp_path / "love"
    (tmp_path / "neutral.txt").write_text("The museum opens at nine.\n")
    rc = run_cli(main, ["--add", "Love", "--sub", "Hate", "--source-layer", "4", "--layer", "6", "--coeff", "4",
                        "--prompt", "I hate you because", "--max-new-tokens", "4", "--seed", "0", "--sweep", "4",
                        "--neutral-file", str(tmp_path / "neutral.txt"),
                        "--save", f"{out}.safetensors", "--npy", f"{out}.npy", "--bin", f"{out}.bin",
                        "--gguf", f"{out}.gguf", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "BASE" in text and "STEERED" in text and "| 4 |" in text and "direction.6" in text
    sv = load_safetensors(f"{out}.safetensors")
    v = sv.directions["layers.6.resid_post"].numpy()
    assert sv.meta["source_point"] == "layers.4.resid_post" and sv.meta["coeff"] == 4.0
    np.testing.assert_allclose(np.load(f"{out}.npy"), 4 * v, rtol=1e-6)
    np.testing.assert_allclose(np.fromfile(f"{out}.bin", dtype=np.float32), 4 * v, rtol=1e-6)
    r = gguf.GGUFReader(f"{out}.gguf")
    assert [t.name for t in r.tensors] == ["direction.6"]
    np.testing.assert_allclose(np.asarray(r.tensors[0].data), 4 * v, rtol=1e-6)


def test_cli_user_errors_exit_2(smollm2, monkeypatch, capsys):
    import collect.model
    from analysis.steer_cli import main
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    assert run_cli(main, ["--prompt", "hi"]) == 2
    assert "exactly one direction source" in capsys.readouterr().err
    assert run_cli(main, ["--add", "Love", "--sub", "Hate", "--layer", "40", "--no-generate"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert run_cli(main, ["--add", "Love", "--op", "clamp"]) == 2
    assert "--sae" in capsys.readouterr().err


def test_cli_sae_latent_clamp_exports_the_decoder_row(smollm2, tmp_path, monkeypatch, capsys):
    import collect.model
    from analysis.steer_cli import main
    from analysis.steer_files import load_gguf
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    from sae.architectures import ArchConfig, build_sae
    from sae.io import save_sae
    g = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(8, 576, generator=g), dim=-1)
    model = build_sae(ArchConfig(arch="relu", d_in=576, d_sae=8))
    with torch.no_grad():
        model.W_dec.copy_(W_dec)
        model.enc.copy_(W_dec)
    sae = save_sae(model, tmp_path / "sae", meta={"hook_point": "layers.6.resid_post", "model": "smollm2-135m"})
    rc = run_cli(main, ["--sae", str(sae), "--latent", "3", "--op", "clamp", "--coeff", "5", "--no-generate",
                        "--gguf", str(tmp_path / "f.gguf"), "--quiet"])
    assert rc == 0, capsys.readouterr()
    got = load_gguf(tmp_path / "f.gguf")
    assert list(got) == [6]
    np.testing.assert_allclose(got[6], W_dec[3].numpy(), rtol=1e-6)


@pytest.mark.parametrize("args", [["--layer", "4,6"], ["--layer", "6", "--read", "per_position"]],
                         ids=["two-layers", "per-position"])
def test_cli_exports_exactly_what_the_hook_added(smollm2, tmp_path, monkeypatch, capsys, args):
    """Regression (issue 12, bug 5): with --coeff-relative the exports used the first point's scale and
    the Frobenius norm, the hook a per-point scale and the largest row norm. Here each point's direction
    is read at itself (different norms) and each point's typical norm is measured (different scales)."""
    import collect.model
    from analysis.steer_cli import main
    from analysis.steer_eval import typical_norm
    from analysis.steer_files import load_gguf, load_safetensors
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    out = tmp_path / "v"
    gguf = [] if "per_position" in args else ["--gguf", f"{out}.gguf"]
    rc = run_cli(main, ["--add", "Love", "--sub", "Hate", *args, "--coeff", "0.5", "--coeff-relative",
                        "--no-generate", "--save", f"{out}.safetensors", "--npy", f"{out}.npy", *gguf, "--quiet"])
    assert rc == 0, capsys.readouterr()
    sv = load_safetensors(f"{out}.safetensors")
    scales = {p: typical_norm(smollm2.model, smollm2.tokenizer, p) for p in sv.points}
    ids = encode(smollm2.tokenizer, "Steering vectors are added to the residual stream here.")
    before: dict = {}
    after: dict = {}

    def rec(d, p):
        def fn(x, call):
            d[p] = x.detach().clone()
        return fn
    with hooks(smollm2.model, {p: rec(before, p) for p in sv.points}):      # sees the input of the edit
        with steer(smollm2.model, sv, coeff=0.5, norm_scale=scales):
            with hooks(smollm2.model, {p: rec(after, p) for p in sv.points}):   # sees its output
                smollm2.model(input_ids=ids, use_cache=False)
    rows = np.load(f"{out}.npy")   # [points, d] for several layers, [positions, d] for a per-position direction
    exported = {p: rows[i] for i, p in enumerate(sv.points)} if len(sv.points) > 1 else {sv.points[0]: rows}
    for p, v in exported.items():
        added = (after[p] - before[p])[0].numpy()           # [positions, d]: what the hook added there
        want = np.zeros_like(added)
        if v.ndim == 1:
            want[:] = v
        else:                                               # row q at absolute position q, nothing beyond
            n = min(len(v), len(want))
            want[:n] = v[:n]
        np.testing.assert_allclose(added, want, atol=2e-3, rtol=1e-4)
        if gguf:
            np.testing.assert_allclose(load_gguf(f"{out}.gguf")[int(p.split(".")[1])], v, rtol=1e-6)
    if len(sv.points) > 1:   # the two points get different effective coefficients
        c = [np.linalg.norm(exported[p]) / float(sv.directions[p].norm()) for p in sv.points]
        assert abs(c[0] - c[1]) > 0.05 * max(c)

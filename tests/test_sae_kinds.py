"""Matryoshka SAEs, transcoders, skip-transcoders and crosscoders recover planted ground truth from one
store, save and load, evaluate (per prefix / per layer) and refuse bad input in one line."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae.config import TrainConfig
from sae.evaluate import evaluate_sae
from sae.io import load_sae
from sae.synthetic import planted_dictionary, planted_rows, write_synthetic_store
from sae.trainer import train
from saeforge.cli import dispatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, NF, N = 32, 32, 16384
IN, OUT, RES, L1 = "layers.0.mlp_in", "layers.0.mlp_out", "layers.0.resid_post", "layers.1.resid_post"


@pytest.fixture(scope="module")
def planted():
    """x (mlp_in) and y (mlp_out) share one sparse code (y = a planted sparse map of x); resid_post =
    a dense linear map of x plus y (a skip term helps); layers.1.resid_post = the code in a third
    dictionary (a crosscoder's second layer)."""
    Dx, ox = planted_dictionary(D, NF, seed=1)
    Dy, oy = planted_dictionary(D, NF, seed=2)
    Dz, oz = planted_dictionary(D, NF, seed=3)
    x, y, z = planted_rows(N, [Dx, Dy, Dz], [ox, oy, oz], active=3, seed=0)
    M = np.random.default_rng(4).standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    return {"dicts": {IN: Dx, OUT: Dy, L1: Dz}, "rows": {IN: x, OUT: y, RES: y + 2.0 * x @ M.T, L1: z}}


@pytest.fixture(scope="module")
def store(planted, tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("kinds") / "s.zarr"), n_tokens=N, d=D, context=64,
                                 shard_rows=1024, rows=planted["rows"])


def _cfg(store, out, **kw):
    base = dict(store=store.path, out=str(out), k=[3], expansion=[1], tokens=256 * 400, batch_size=256,
                wandb="disabled", quiet=True, eval_every=0, lr=[1e-2], optimizer=["adam"], checkpoint_every=0,
                scale_sample=4096)
    base.update(kw)
    return TrainConfig(**base)


def _best_match(W: torch.Tensor, Dt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent: |cos| with its best-matching planted feature, and that feature's index."""
    cos = F.normalize(W.detach().float(), dim=1) @ torch.from_numpy(Dt).T
    best = cos.abs().max(1)
    return best.values, best.indices


def _recovered(W: torch.Tensor, Dt: np.ndarray, thr: float = 0.9) -> float:
    """Fraction of planted features some latent's row matches with |cos| > thr."""
    cos = F.normalize(W.detach().float(), dim=1) @ torch.from_numpy(Dt).T
    return float((cos.abs().max(0).values > thr).float().mean())


def test_matryoshka_first_group_holds_the_most_frequent_features(store, planted, tmp_path):
    res = train(_cfg(store, tmp_path / "m", hook=IN, arch=["matryoshka"], matryoshka_groups=[0.25, 0.75]))
    m = next(iter(res.metrics.values()))
    sae = load_sae(tmp_path / "m")
    assert sae.cfg.arch == "matryoshka" and sae.cfg.group_sizes == [8, 24]
    _, idx = _best_match(sae.W_dec, planted["dicts"][IN])
    # feature i fires ∝ 1/(i+1)^0.6: the 8 latents of the first group should be among the 8 most frequent
    # (chance: 2 of 8); the planted features are found
    assert int((idx[:8] < 8).sum()) >= 5, idx.tolist()
    assert _recovered(sae.W_dec, planted["dicts"][IN]) > 0.3
    # eval of the saved SAE reports every prefix; the first prefix alone explains less than all of it
    ev = evaluate_sae(sae, store, IN, tokens=None)
    assert ev["prefix_sizes"] == [8, 32] and ev["prefix_fvu"][1] == pytest.approx(ev["fvu"], rel=1e-6)
    assert ev["fvu"] < ev["prefix_fvu"][0] < 1.0 and ev["fvu"] < 0.15, ev
    assert ev["fvu"] == pytest.approx(m["heldout_fvu"], rel=1e-3)  # training-time eval agrees (raw units)
    assert m["heldout_prefix8_fvu"] == pytest.approx(ev["prefix_fvu"][0], rel=1e-3)


def test_transcoder_recovers_a_planted_sparse_map(store, planted, tmp_path):
    res = train(_cfg(store, tmp_path / "t", hook=IN, target=OUT, arch=["batchtopk"]))
    m = next(iter(res.metrics.values()))
    assert m["heldout_fvu"] < 0.1, m  # FVU of the target y; the mean predictor scores 1
    sae = load_sae(tmp_path / "t")
    assert sae.cfg.kind == "transcoder"
    assert _recovered(sae.W_dec, planted["dicts"][OUT]) > 0.7  # the decoder writes y's features
    assert _recovered(sae.W_dec, planted["dicts"][IN]) < 0.2  # not x's
    ev = evaluate_sae(sae, store, IN, target=OUT, tokens=None)
    assert ev["fvu"] == pytest.approx(m["heldout_fvu"], rel=1e-3) and ev["target_hook_point"] == OUT
    # `features` reads the latents at the input positions: its counts equal encoding the input rows
    from analysis.features import feature_stats
    from sae.io import check_store_points, read_cfg
    ins, outs = check_store_points(read_cfg(tmp_path / "t"), store, tmp_path / "t")
    st = feature_stats(sae, store, ins[0], split="heldout", top=4, samples=4, window=2, block_rows=1000)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(store.activations(IN)[store.split_mask("heldout")]))
    assert (ins, outs) == ([IN], [OUT]) and st.count.sum() > 0 and torch.equal(st.count, (f > 0).sum(0))


def test_skip_transcoder_learns_the_dense_part(store, tmp_path):
    """resid_post = 2·M x + (sparse map of x): the skip term takes the dense part a TopK code cannot."""
    fvu = {}
    for skip in (False, True):
        res = train(_cfg(store, tmp_path / f"s{skip}", hook=IN, target=RES, arch=["topk"], skip=skip,
                         tokens=256 * 200))
        fvu[skip] = next(iter(res.metrics.values()))["heldout_fvu"]
    assert fvu[True] < 0.5 * fvu[False], fvu
    sae = load_sae(tmp_path / "sTrue")
    assert sae.cfg.kind == "skip_transcoder" and sae.W_skip.abs().sum() > 0
    ev = evaluate_sae(sae, store, IN, target=RES, tokens=None)
    assert ev["fvu"] == pytest.approx(fvu[True], rel=1e-3)


def test_crosscoder_recovers_features_planted_across_layers(store, planted, tmp_path):
    res = train(_cfg(store, tmp_path / "c", arch=["crosscoder"], hooks=[IN, L1]))
    m = next(iter(res.metrics.values()))
    sae = load_sae(tmp_path / "c")
    assert sae.cfg.kind == "crosscoder" and sae.cfg.n_layers == 2
    for j, h in enumerate([IN, L1]):
        assert _recovered(sae.W_dec[:, sae.layer_slice(j)], planted["dicts"][h]) > 0.7, h
    # one latent is one feature in both layers: its two decoder halves match the same planted index
    v0, i0 = _best_match(sae.W_dec[:, sae.layer_slice(0)], planted["dicts"][IN])
    v1, i1 = _best_match(sae.W_dec[:, sae.layer_slice(1)], planted["dicts"][L1])
    good = (v0 > 0.9) & (v1 > 0.9)
    assert good.sum() > 10 and bool((i0[good] == i1[good]).all())
    ev = evaluate_sae(sae, store, [IN, L1], tokens=None)
    assert len(ev["layer_fvu"]) == 2 and max(ev["layer_fvu"]) < 0.15, ev
    assert ev["fvu"] == pytest.approx(np.mean(ev["layer_fvu"])) == pytest.approx(m["heldout_fvu"], rel=1e-3)
    assert m["heldout_layer1_fvu"] == pytest.approx(ev["layer_fvu"][1], rel=1e-3)
    # `features` reads the shared code of both layers side by side: its counts and top values equal encoding them
    from analysis.features import feature_stats
    st = feature_stats(sae, store, [IN, L1], split="heldout", top=3, samples=4, window=2, block_rows=1000)
    held = store.split_mask("heldout")
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(np.concatenate([store.activations(h)[held] for h in (IN, L1)], 1)))
    assert st.count.sum() > 0 and torch.equal(st.count, (f > 0).sum(0))
    assert torch.allclose(st.max_act, f.max(0).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,msg", [
    (["--hook", IN, "--target", "layers.5.mlp_out"], "hook point 'layers.5.mlp_out' (--target) is not in store"),
    (["--hook", IN, "--skip"], "--skip adds the skip term of a skip-transcoder; it needs --target"),
    (["--hook", IN, "--target", OUT, "--arch", "relu"], "--target trains transcoders, which need a TopK-family"),
    (["--arch", "crosscoder", "--hooks", IN], "needs --hooks with at least two hook points"),
    (["--hooks", f"{IN},{L1}"], "add --arch crosscoder"),
    (["--hook", IN, "--arch", "matryoshka", "--matryoshka-groups", "0.5,0.2"], "summing to 1"),
])
def test_bad_input_is_one_line_exit_2(store, tmp_path, capsys, args, msg):
    assert dispatch(["train", "--store", store.path, "--out", str(tmp_path / "o"), "--wandb", "disabled", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


def test_crosscoder_of_hooks_of_different_widths_is_refused(store, tmp_path, capsys, monkeypatch):
    """Stores written by `saeforge collect` hold one width; a store of mixed widths is refused in one line."""
    from collect.store import Store
    real = Store.raw_activations

    def narrow_l1(self, hook, a=0, b=None):
        out = real(self, hook, a, b)
        return out[:, :8] if hook == L1 else out
    monkeypatch.setattr(Store, "raw_activations", narrow_l1)
    assert dispatch(["train", "--store", store.path, "--out", str(tmp_path / "o"), "--wandb", "disabled",
                     "--arch", "crosscoder", "--hooks", f"{IN},{L1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs hook points of one width" in err and f"{L1} (d=8)" in err and len(err.splitlines()) == 1, err


def test_resume_is_exact_for_a_matryoshka_skip_transcoder(store, tmp_path):
    """b_in, W_skip, the per-hook scales and the threshold survive a SIGINT checkpoint and --resume."""
    import os
    import signal

    from safetensors.torch import load_file
    kw = dict(hook=IN, target=RES, skip=True, arch=["matryoshka"], matryoshka_groups=[0.5, 0.5], tokens=256 * 24,
              checkpoint_every=256 * 7, dead_tokens=256 * 3)
    train(_cfg(store, tmp_path / "full", **kw))

    def interrupt(t):
        if t.step == 13:
            os.kill(os.getpid(), signal.SIGINT)
    assert train(_cfg(store, tmp_path / "cut", **kw), on_step=interrupt).interrupted
    res = train(_cfg(store, tmp_path / "cut", resume=True, **kw))
    assert not res.interrupted and res.tokens == 256 * 24
    a, b = load_file(tmp_path / "full" / "sae.safetensors"), load_file(tmp_path / "cut" / "sae.safetensors")
    assert sorted(a) == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc", "threshold"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- a real SmolLM2 store: each kind beats the mean predictor; splicing is what it says ----------------

R_IN, R_OUT, R2, R3 = "layers.3.mlp_in", "layers.3.mlp_out", "layers.2.resid_post", "layers.3.resid_post"


@pytest.fixture(scope="module")
def real(smollm2, wikitext_dir, tmp_path_factory):
    from tests.smollm_stores import paragraph_store
    tmp = tmp_path_factory.mktemp("kreal")
    store = paragraph_store(smollm2, wikitext_dir, tmp, [R_IN, R_OUT, R2, R3], chars=60000, max_tokens=2048,
                            heldout_fraction=0.3)
    common = dict(store=store.path, k=[16], expansion=[2], batch_size=256, tokens=4096, wandb="disabled", quiet=True,
                  scale_sample=1024, warmup_steps=1, eval_rows=256, checkpoint_every=0)
    dirs = {}
    # ~1,400 training rows, 3 epochs: BatchTopK's threshold and a transcoder (whose encoder does not start
    # as its decoder's transpose) need more than the 4 steps an SAE needs to beat the mean
    for name, kw in {"transcoder": dict(hook=R_IN, target=R_OUT, arch=["batchtopk"]),
                     "matryoshka": dict(hook=R3, arch=["matryoshka"]),
                     "crosscoder": dict(hooks=[R2, R3], arch=["crosscoder"])}.items():
        res = train(TrainConfig(out=str(tmp / name), **common, **kw))
        dirs[name] = (res.out_dirs[0], next(iter(res.metrics.values())))
    return store, dirs


@pytest.mark.slow  # shares a ~60 s fixture (model, store of 4 hook points, 3 trainings)
def test_real_store_each_kind_beats_the_mean_predictor(real):
    _, dirs = real
    for name, (_, m) in dirs.items():
        assert m["heldout_fvu"] < 0.95, (name, m)  # the mean predictor scores 1.0


@pytest.mark.slow  # shares a ~60 s fixture (model, store of 4 hook points, 3 trainings)
def test_transcoder_splice_matches_direct_computation(real, smollm2, monkeypatch, tmp_path):
    """`saeforge eval` on a transcoder: CE/KL equal a forward whose MLP output is replaced by hand (a plain
    torch hook on the MLP module, at keep positions) with the transcoder of the MLP's input."""
    import json

    import sae.evaluate as ev
    from sae.splice import split_sequences
    store, dirs = real
    sae_dir = dirs["transcoder"][0]
    monkeypatch.setattr(ev, "load_store_model", lambda st, device="cpu": smollm2)
    out = tmp_path / "e.json"
    assert dispatch(["eval", str(sae_dir), "--store", store.path, "--tokens", "0", "--ce-tokens", "64", "--bootstrap",
                     "0", "--quiet", "--wandb", "disabled", "--out", str(out)]) == 0  # 9 held-out sequences: no intervals
    m = json.loads(out.read_text())["metrics"]
    assert m["ce_spliced_hook_points"] == [R_OUT] and m["target_hook_point"] == R_OUT
    assert m["kl_div_sae"] < m["kl_div_zero"] and m["ce_loss_sae"] < m["ce_loss_zero"]
    sae = load_sae(sae_dir)
    toks, keep, _ = split_sequences(store, 1)
    ids = torch.from_numpy(toks.astype(np.int64))
    kp = torch.from_numpy(keep)
    lm = smollm2.model

    def replace_mlp(mod, args, output):
        out = output.clone()
        out[kp] = sae.encode_decode(args[0][kp])[1]
        return out
    with torch.no_grad():
        clean = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        h = lm.model.layers[3].mlp.register_forward_hook(replace_mlp)
        try:
            spliced = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        finally:
            h.remove()
    t, sel = ids[0, 1:], slice(1, None)  # drop the prediction made from BOS
    assert m["ce_loss_sae"] == pytest.approx(float(-spliced[sel].gather(-1, t[sel, None]).mean()), rel=1e-4)
    assert m["kl_div_sae"] == pytest.approx(float((clean.exp() * (clean - spliced)).sum(-1)[sel].mean()),
                                            rel=1e-3, abs=1e-5)


@pytest.mark.slow  # shares a ~60 s fixture (model, store of 4 hook points, 3 trainings)
def test_identity_crosscoder_splices_to_the_clean_model(real, smollm2):
    """A crosscoder that reproduces both layers exactly (±e_i latents, k = every positive one) scores 1,
    replacing every layer at once and each alone; the Matryoshka SAE reports its prefixes."""
    from sae.architectures import ArchConfig, build_sae
    store, dirs = real
    d = store.d_model
    w = 2 * d
    sae = build_sae(ArchConfig("crosscoder", d, 2 * w, k=w, n_layers=2)).eval()
    eye = torch.eye(w)
    with torch.no_grad():
        sae.enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    m = evaluate_sae(sae, store, [R2, R3], tokens=64, ce_tokens=64, model=smollm2)
    assert max(m["layer_fvu"]) < 1e-10
    assert m["kl_div_sae"] < 1e-6 and m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert max(m["kl_div_sae_layers"]) < 1e-6 and len(m["ce_loss_sae_layers"]) == 2
    ev = evaluate_sae(load_sae(dirs["matryoshka"][0]), store, R3, tokens=200)
    assert len(ev["prefix_fvu"]) == 5 and ev["prefix_fvu"][-1] == pytest.approx(ev["fvu"])
    assert all(a >= b - 1e-9 for a, b in zip(ev["prefix_fvu"], ev["prefix_fvu"][1:])), ev["prefix_fvu"]


@pytest.mark.slow  # shares a ~60 s fixture (model, store of 4 hook points, 3 trainings)
def test_steering_from_a_latent_of_each_kind(real, smollm2):
    """A transcoder latent steers where it writes (the MLP output); a crosscoder latent is one direction
    per layer; reading a transcoder latent where it is injected (--op clamp) is refused in one line."""
    from analysis.directions import from_sae, load_sae_latent
    from saeforge.errors import UserError
    _, dirs = real
    tc, cc = dirs["transcoder"][0], dirs["crosscoder"][0]
    sv = from_sae(smollm2.model, tc, 3)
    assert list(sv.directions) == [R_OUT]
    assert torch.equal(sv.directions[R_OUT], load_sae(tc).W_dec[3].detach())
    sv = from_sae(smollm2.model, cc, 5)
    w = load_sae(cc).W_dec[5].detach()
    assert list(sv.directions) == [R2, R3] and torch.equal(torch.cat([sv.directions[R2], sv.directions[R3]]), w)
    with pytest.raises(UserError, match="cannot be read where it is injected"):
        load_sae_latent(tc, 3)
    with pytest.raises(UserError, match="drop --layer"):
        from_sae(smollm2.model, cc, 5, layers=[R3])

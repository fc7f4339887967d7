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

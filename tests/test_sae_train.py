"""Training on synthetic sparse data: loss falls, held-out FVU beats the mean, invariants hold."""
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae.architectures import ArchConfig, build_sae
from sae.config import TrainConfig
from sae.init import unit_norm_scale
from sae.io import load_sae, save_sae
from sae.optim import OPTIMIZERS
from sae.synthetic import synthetic_rows, write_synthetic_store
from sae.trainer import Trainer, train
from saeforge.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "layers.0.resid_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("st") / "s.zarr"), n_tokens=16384, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _cfg(store, out, **kw):
    base = dict(store=store.path, out=str(out), arch=["topk"], k=[3], expansion=[4], tokens=256 * 60,
                batch_size=256, wandb="disabled", quiet=True, eval_every=0, lr=[3e-3], checkpoint_every=0,
                scale_sample=4096)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch,extra", [("topk", {}), ("batchtopk", {}), ("relu", {"l1_coef": 1.0}),
                                        ("jumprelu", {})])
def test_each_arch_learns(store, tmp_path, arch, extra):
    losses = []
    res = train(_cfg(store, tmp_path / arch, arch=[arch], tokens=256 * 120, **extra),
                on_step=lambda t: losses.append(float(t.members[0].last["fvu"])))
    m = next(iter(res.metrics.values()))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses[::10]
    assert m["heldout_fvu"] < 0.6, m  # the mean predictor scores 1.0
    sae = load_sae(tmp_path / arch)
    assert sae.cfg.arch == arch
    if sae.unit_norm_decoder:  # y is renormalised every step; the saved average x of unit rows stays near 1
        assert (sae.W_dec.norm(dim=1) - 1).abs().max() < 0.02


def test_each_optimizer_learns_at_its_default_lr(store, tmp_path):
    """One pass trains a member per optimizer; each beats the mean predictor on held-out rows."""
    res = train(_cfg(store, tmp_path / "opt", optimizer=list(OPTIMIZERS), lr=[], tokens=256 * 120))
    assert sorted(res.metrics) == sorted(f"topk_k3_x4_{o}" for o in OPTIMIZERS)
    for name, m in res.metrics.items():
        assert m["heldout_fvu"] < 0.5, (name, m)  # the mean predictor scores 1.0


def test_sweep_trains_every_member_in_one_pass(store, tmp_path):
    res = train(_cfg(store, tmp_path / "sw", k=[2, 4], expansion=[2, 4], tokens=256 * 20))
    assert sorted(p.name for p in res.out_dirs) == ["topk_k2_x2", "topk_k2_x4", "topk_k4_x2", "topk_k4_x4"]
    for p in res.out_dirs:
        t = load_file(p / "sae.safetensors")
        assert t["W_enc"].shape[0] == 16 and t["W_dec"].shape[1] == 16


def test_saved_sae_takes_raw_activations(store, tmp_path):
    """The folded SAE on raw x equals the trained SAE on scaled x (latents and output in raw units)."""
    torch.manual_seed(0)
    x = torch.from_numpy(synthetic_rows(512, 16, 64, 3)) * 7.0
    s = unit_norm_scale(x)
    for arch in ["topk", "batchtopk", "jumprelu", "relu"]:
        sae = build_sae(ArchConfig(arch, 16, 64, k=3), b_dec=(x * s).mean(0))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.05)
            if arch == "batchtopk":
                sae.threshold.fill_(0.05)
        sae.eval()
        save_sae(sae, tmp_path / arch, scale=s)
        raw = load_sae(tmp_path / arch)
        f_train = sae.encode(x * s)
        assert (f_train > 0).any()
        assert torch.allclose(raw.encode(x) * s, f_train, atol=1e-5)
        assert torch.allclose(raw.decode(raw.encode(x)), sae.decode(f_train) / s, atol=1e-4)


def test_decoder_norms_stay_one_and_grad_is_projected():
    torch.manual_seed(0)
    sae = build_sae(ArchConfig("topk", 16, 64, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 16)
    for _ in range(5):
        out = sae(x)
        out.loss.backward()
        sae.project_decoder_grad()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6  # tangent to the unit sphere
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_auxk_revives_dead_latents():
    """Latents whose encoder rows are shrunk never win the TopK; AuxK trains them back into use."""
    x = torch.from_numpy(synthetic_rows(8192, 16, 64, 3))
    x = x * unit_norm_scale(x)
    revived = {}
    for coef in (0.0, 1.0 / 32):
        torch.manual_seed(0)
        sae = build_sae(ArchConfig("topk", 16, 64, k=3, aux_coef=coef), b_dec=x.mean(0))
        with torch.no_grad():
            sae.enc[:32] *= 0.01
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        dead = torch.zeros(64, dtype=torch.bool)
        dead[:32] = True
        for step in range(150):
            xb = x[(step * 256) % 8192:][:256]
            out = sae(xb, dead_mask=dead)
            out.loss.backward()
            sae.project_decoder_grad()
            opt.step()
            opt.zero_grad()
            sae.normalize_decoder()
            if coef:
                assert out.terms["aux"] > 0
        with torch.no_grad():
            revived[coef] = int((sae.encode(x)[:, :32] > 0).any(0).sum())
    assert revived[0.0] <= 2, revived
    assert revived[1.0 / 32] >= 8, revived


def test_resume_is_exact(store, tmp_path):
    """SIGINT mid-run checkpoints; --resume ends with the same weights as an uninterrupted run, for every
    optimizer (schedule-free ones checkpoint both weight sequences and their averaging weights)."""
    kw = dict(tokens=256 * 30, checkpoint_every=256 * 7, dead_tokens=256 * 3, eval_every=10,
              optimizer=list(OPTIMIZERS), lr=[])
    train(_cfg(store, tmp_path / "full", **kw))

    def interrupt(t):
        if t.step == 17:
            os.kill(os.getpid(), signal.SIGINT)

    res = train(_cfg(store, tmp_path / "cut", **kw), on_step=interrupt)
    assert res.interrupted and (tmp_path / "cut" / "checkpoint.pt").is_file()
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all("z" in st for m in ck["members"][1:] for st in m["opt"]["state"].values())  # schedule-free
    assert not list((tmp_path / "cut").glob("*/sae.safetensors"))
    with pytest.raises(UserError, match="--resume"):
        train(_cfg(store, tmp_path / "cut", **kw))
    with pytest.raises(UserError, match="changed config.*k"):
        train(_cfg(store, tmp_path / "cut", resume=True, **{**kw, "k": [5]}))
    res = train(_cfg(store, tmp_path / "cut", resume=True, **kw))
    assert not res.interrupted and res.tokens == 256 * 30
    for opt in OPTIMIZERS:
        sub = f"topk_k3_x4_{opt}"
        a, b = load_file(tmp_path / "full" / sub / "sae.safetensors"), load_file(tmp_path / "cut" / sub / "sae.safetensors")
        for name in a:
            assert torch.equal(a[name], b[name]), (opt, name, float((a[name] - b[name]).abs().max()))
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_crafted_checkpoint_is_refused_without_running_code(store, tmp_path):
    """A checkpoint.pt whose pickle would run code (issue 12) is refused with one line on --resume."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"version": 1, "members": [Payload()]}, evil / "checkpoint.pt")
    with pytest.raises(UserError, match="checkpoint.pt.*not a saeforge checkpoint") as e:
        train(_cfg(store, evil, resume=True))
    assert "\n" not in str(e.value) and not marker.exists()
    torch.load(evil / "checkpoint.pt", weights_only=False)  # the payload is live: unrestricted loading runs it
    assert marker.exists()


def test_cfg_json_records_provenance(store, tmp_path):
    import json
    train(_cfg(store, tmp_path / "o", tokens=256 * 4))
    cfg = json.loads((tmp_path / "o" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "k", "hook_point", "model", "model_hash", "store",
                "normalization", "training_tokens", "final_metrics", "config"):
        assert key in cfg, key
    assert cfg["hook_point"] == HOOK and cfg["training_tokens"] == 1024 and cfg["d_sae"] == 64


def test_user_errors(store, tmp_path):
    with pytest.raises(UserError, match="layers.3.mlp_out"):
        Trainer(_cfg(store, tmp_path / "e", hook="layers.3.mlp_out"))
    with pytest.raises(UserError, match="not found"):
        Trainer(TrainConfig(store=str(tmp_path / "missing.zarr"), out=str(tmp_path / "e"), wandb="disabled"))
    with pytest.raises(UserError, match="fewer than one batch"):
        train(_cfg(store, tmp_path / "e", batch_size=20000, tokens=20000))
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        train(_cfg(store, tmp_path / "e2", resume=True))
    with pytest.raises(UserError, match="--arch"):
        _cfg(store, tmp_path / "e", arch=["gated"]).validate()
    rows = np.random.default_rng(0).standard_normal((2048, 16)).astype(np.float32)
    for name, at in (("train", 600), ("heldout", 1500)):  # row 1500 is in a held-out sequence
        bad = rows.copy()
        bad[at:at + 10] = np.nan
        nan_store = write_synthetic_store(str(tmp_path / f"nan_{name}.zarr"), n_tokens=2048, d=16, rows=bad,
                                          shard_rows=512)
        with pytest.raises(UserError, match="NaN"):
            train(_cfg(nan_store, tmp_path / f"e_{name}", scale_sample=256))


def test_signum_schedulefree_matches_the_schedulefree_wrapper():
    """Our 4-pass schedule-free sign-SGD takes the iterates of schedulefree.ScheduleFreeWrapper(SignSGD)
    (sparsify's default optimizer), through warm-up and per-group lrs, and averages to the same x."""
    schedulefree = pytest.importorskip("schedulefree")
    from sae.optim import SignSGD, TrainOptimizer
    torch.manual_seed(0)
    init = {"enc": torch.randn(64, 16), "b_enc": torch.randn(64), "W_dec": torch.randn(64, 16), "b_dec": torch.randn(16)}
    ours = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = TrainOptimizer("signum-schedulefree", list(ours.items()), 1e-2, momentum=0.9, bias_lr_scale=0.1)
    groups = [dict(params=[ref["enc"], ref["W_dec"]], lr=1e-2), dict(params=[ref["b_enc"], ref["b_dec"]], lr=1e-3)]
    wrap = schedulefree.ScheduleFreeWrapper(SignSGD(groups), momentum=0.9)
    wrap.train()
    for i in range(40):
        lr = 1e-2 * min(1.0, (i + 1) / 10)
        opt.set_lr(lr)
        wrap.param_groups[0]["lr"], wrap.param_groups[1]["lr"] = lr, lr / 10
        for n in init:
            g = torch.randn_like(init[n])
            ours[n].grad, ref[n].grad = g.clone(), g.clone()
        opt.step()
        wrap.step()
        wrap.zero_grad()
    for n in init:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n
    averaged = dict(zip(ours, opt.averaged()))
    wrap.eval()
    for n in init:
        assert torch.allclose(averaged[n], ref[n], atol=1e-5), n
    assert not torch.allclose(averaged["enc"], ours["enc"], atol=1e-3)  # x is not y: the average is used


def test_decoder_is_renormalised_before_the_forward_so_the_average_uses_the_step_s_y(store, tmp_path):
    """sparsify's order: W_dec rows are set to unit norm before each forward, so the parameters keep y as
    the optimizer step left it and schedule-free's average x = lerp(y, z, 1 − 1/β) is formed from that y.
    (README, Performance: 0.1695 held-out FVU in this order against 0.1708 renormalising after the step,
    from one shared init, in diagnostic runs on bench/quality.py's batches.) A hand-written loop in that order reproduces the trainer's inference weights."""
    import copy

    from sae.optim import TrainOptimizer
    tr = Trainer(_cfg(store, tmp_path / "t", lr=[], dead_tokens=10**9))
    tr._init_fresh()
    m = tr.members[0]
    ref = copy.deepcopy(m.sae)
    opt = TrainOptimizer("signum-schedulefree", list(ref.named_parameters()), m.spec.lr, momentum=tr.cfg.momentum,
                         bias_lr_scale=tr.cfg.bias_lr_scale)
    rows = torch.from_numpy(synthetic_rows(256 * 12, 16, 64, 3, seed=1)) * tr.scale
    for xb in rows.split(256):
        tr.train_step(xb)
        ref.normalize_decoder()
        ref(xb, dead_mask=torch.zeros(ref.cfg.d_sae, dtype=torch.bool)).loss.backward()
        ref.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), tr.cfg.grad_clip)
        opt.step()
    assert (ref.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # y as the step left it is off the sphere
    want = dict(zip([n for n, _ in ref.named_parameters()], opt.averaged()))
    with tr.inference(m) as sae:
        got = {n: p.detach().clone() for n, p in sae.named_parameters()}
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), (n, float((got[n] - want[n]).abs().max()))
    # renormalising after the step instead averages from another point
    y = ref.W_dec.detach() / ref.W_dec.detach().norm(dim=1, keepdim=True)
    other = torch.lerp(y, opt.opt.state[ref.W_dec]["z"], 1 - 1 / opt.beta)
    assert (other - want["W_dec"]).abs().max() > 1e-4

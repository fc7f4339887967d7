"""Evaluation: streamed metrics equal brute force for any --tokens and batch size; splice scores
(identity → 1 and KL 0, zero → 0, a trained SAE → a direct computation); CLI, wandb and errors."""
import json
import time

import numpy as np
import pytest
import torch

from saeforge.cli import dispatch
from sae.architectures import ArchConfig, build_sae
from sae.evaluate import evaluate_rows, evaluate_sae, reconstruction_metrics
from sae.io import load_sae, save_sae
from sae.synthetic import write_synthetic_store

HOOK0 = "layers.0.resid_post"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("ev") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _rand_sae(arch="topk", d=16, n=64, seed=0, b_dec=None):
    return build_sae(ArchConfig(arch, d, n, k=3), b_dec=b_dec, generator=torch.Generator().manual_seed(seed)).eval()


def _brute(sae, x):
    """Direct numpy figures on rows x (float64)."""
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x))
        xh = sae.decode(f).double().numpy()
    x = x.astype(np.float64)
    err = ((x - xh) ** 2).sum()
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    fires = (f > 0).numpy()
    dens = fires.mean(0)
    return {"fvu": err / ((x - x.mean(0)) ** 2).sum(), "mse": err / x.size, "sq_err_per_token": err / len(x),
            "cossim": np.mean((x * xh).sum(1) / (nx * nh)), "l2_ratio": np.mean(nh / nx),
            "l0": fires.sum(1).mean(), "dead_fraction": (dens == 0).mean(), "dense_fraction": (dens > 0.1).mean()}


def _span(store, n):
    """Brute force selection: held-out rows up to the n-th held-out keep row, and which are keep."""
    held, keep = store.heldout().astype(bool), store.keep().astype(bool)
    main = held & keep
    last = np.flatnonzero(main)[n - 1] if n <= main.sum() else store.n_tokens - 1
    idx = np.flatnonzero(held[: last + 1])
    return store.activations(HOOK0)[idx], keep[idx]


@pytest.mark.parametrize("n,batch", [(1, 7), (37, 16), (500, 64), (None, 4096)])
def test_streamed_metrics_equal_brute_force(syn, n, batch):
    sae = _rand_sae(b_dec=torch.from_numpy(syn.activations(HOOK0, 0, 512).mean(0)))
    m = reconstruction_metrics(sae, syn, HOOK0, tokens=n, batch_rows=batch)
    x, keep = _span(syn, n or 10 ** 9)
    ref = _brute(sae, x[keep])
    assert m["n_rows"] == keep.sum() == (n or int(syn.split_mask("heldout").sum()))
    for k, v in ref.items():
        if n == 1 and k == "fvu":
            continue  # one row: no variance
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"]) if n != 1 else True
    assert m["all_rows_n_rows"] == len(x)
    assert m["all_rows_fvu"] == pytest.approx(_brute(sae, x)["fvu"], rel=1e-5)
    hist = m["latent_density_hist"]
    assert sum(hist["counts"]) + hist["dead"] == 64 and hist["dead"] == round(ref["dead_fraction"] * 64)


def test_agrees_with_trainer_metrics_and_folded_scale(syn):
    x = torch.from_numpy(syn.activations(HOOK0, 0, 2048)[syn.split_mask("train", 0, 2048)])
    sae = _rand_sae(arch="relu", seed=1)
    with torch.no_grad():
        f = sae.encode(x)
        err = (sae.decode(f) - x).pow(2).sum()
    full = evaluate_rows(sae, x, batch_rows=100)
    assert full["fvu"] == pytest.approx(float(err / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert full["l0"] == pytest.approx(float((f > 0).sum(1).float().mean()))
    assert full["dead_fraction"] == pytest.approx(float(((f > 0).sum(0) == 0).float().mean()))
    assert full["sq_err_per_token"] == pytest.approx(float(err / len(x)), rel=1e-5)
    assert full["mse"] == pytest.approx(float(err / x.numel()), rel=1e-5)  # per element, as the README says
    # the trainer's live SAE takes x·scale; evaluating it with input_scale equals the saved (folded) SAE
    s = 0.37
    live = evaluate_rows(sae, x, input_scale=s)
    folded = _rand_sae(arch="relu", seed=1)
    folded.fold_input_scale(s)
    ref = evaluate_rows(folded, x)
    for k in ("fvu", "mse", "cossim", "l2_ratio", "l0", "dead_fraction"):
        assert live[k] == pytest.approx(ref[k], rel=1e-4), k


def _save(sae, path, store, **over):
    meta = {"hook_point": store.hooks[0], "model": store.model_spec, "model_hash": store.model_hash,
            "store": store.path, **over}
    return save_sae(sae, path, meta=meta)


def test_cli_writes_eval_json_and_logs_to_the_recorded_wandb_run(syn, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from sae.wandb_log import RunLogger
    run = RunLogger("offline", "saeforge-test", {"x": 1}, name="t", directory=str(tmp_path))
    run.finish()
    time.sleep(1.1)  # offline run folders are named by the second: keep the eval's folder apart from the train run's
    d = _save(_rand_sae(), tmp_path / "sae", syn, wandb_run_id=run.run_id, wandb_dir=str(tmp_path))
    assert dispatch(["eval", str(d), "--tokens", "300", "--ce-tokens", "0", "--quiet", "--min-sequences", "4"]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "L0" in out and run.run_id in out and "±" in out
    res = json.loads((d / "eval.json").read_text())
    assert res["metrics"]["n_rows"] == 300 and 0 < res["metrics"]["fvu"]
    lo, hi = res["metrics"]["fvu_ci95"]
    assert lo < res["metrics"]["fvu"] < hi and res["metrics"]["n_sequences"] == 5
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run.run_id}"))) == 2  # the train run + eval resume


@pytest.mark.parametrize("case,msg", [
    ("hook", "layers.3.mlp_out"), ("hash", "weights hash"), ("noheld", "--heldout-fraction"),
    ("split", "--split"), ("notsae", "not an SAE directory"),
])
def test_cli_user_errors(syn, tmp_path, capsys, case, msg):
    store, over = syn, {}
    if case == "hook":
        over = {"hook_point": "layers.3.mlp_out"}
    elif case == "hash":
        over = {"model_hash": "0123abcd"}
    elif case == "noheld":
        store = write_synthetic_store(str(tmp_path / "nh.zarr"), n_tokens=1024, d=16, n_features=64, active=3,
                                      context=64, shard_rows=1024, heldout_every=10 ** 6)
    d = _save(_rand_sae(), tmp_path / "sae", store, **over)
    args = ["eval", str(d if case != "notsae" else tmp_path), "--store", store.path, "--ce-tokens", "0", "--quiet",
            "--wandb", "disabled"]
    if case == "split":
        args += ["--split", "validation"]
    assert dispatch(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- with the real model ---------------------------------------------------------------------

HOOK = "layers.6.resid_post"


@pytest.fixture(scope="module")
def real(smollm2, wikitext_dir, tmp_path_factory):
    from collect.collector import CollectConfig, collect_activations
    tmp = tmp_path_factory.mktemp("evreal")
    # paragraphs (title lines dropped) are short documents, so held-out ones come early in the stream
    text = (wikitext_dir / "valid.txt").read_text()[:60000]
    (tmp / "paras.txt").write_text("\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("=")))
    store = collect_activations(CollectConfig(corpus=str(tmp / "paras.txt"), hooks=[HOOK], context=64,
                                              max_tokens=2048, heldout_fraction=0.3, shard_rows=256,
                                              out=str(tmp / "s.zarr"), quiet=True), loaded=smollm2)
    from sae.config import TrainConfig
    from sae.trainer import train
    res = train(TrainConfig(store=store.path, hook=HOOK, out=str(tmp / "sae"), k=[16], expansion=[2], tokens=1024,
                            batch_size=256, wandb="disabled", quiet=True, scale_sample=1024, warmup_steps=1,
                            eval_rows=256, checkpoint_every=0))
    return store, res.out_dirs[0]


def _identity_sae(d):
    sae = build_sae(ArchConfig("relu", d, 2 * d)).eval()
    eye = torch.eye(d)
    with torch.no_grad():
        sae.enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d):
    sae = build_sae(ArchConfig("topk", d, 64, k=4), generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_scores_one_and_zero_scores_zero(real, smollm2):
    store, _ = real
    ident = evaluate_sae(_identity_sae(store.d_model), store, HOOK, tokens=200, ce_tokens=128, model=smollm2)
    assert ident["fvu"] == 0 and ident["cossim"] == pytest.approx(1) and ident["l2_ratio"] == pytest.approx(1)
    assert ident["ce_loss_score"] == pytest.approx(1, abs=1e-4) and ident["kl_div_score"] == pytest.approx(1, abs=1e-6)
    assert abs(ident["kl_div_sae"]) < 1e-5 and ident["ce_loss_sae"] == pytest.approx(ident["ce_loss_clean"], abs=1e-5)
    assert ident["ce_loss_zero"] > ident["ce_loss_clean"] + 0.5 and ident["kl_div_zero"] > 0.5
    assert ident["ce_positions"] == 2 * 62  # 2 sequences of 64: no target for the last, none from BOS
    zero = evaluate_sae(_zero_sae(store.d_model), store, HOOK, tokens=200, ce_tokens=128, model=smollm2)
    assert zero["ce_loss_score"] == pytest.approx(0, abs=1e-4) and zero["kl_div_score"] == pytest.approx(0, abs=1e-5)
    assert zero["ce_loss_clean"] == pytest.approx(ident["ce_loss_clean"], rel=1e-6)


def test_trained_sae_matches_direct_computation(real, smollm2):
    """CE/KL of one held-out sequence and reconstruction of a few rows, computed by hand."""
    from collect.hooks import hooks, replace_with
    from sae.splice import split_sequences
    store, sae_dir = real
    sae = load_sae(sae_dir)
    m = evaluate_sae(sae, store, HOOK, tokens=40, ce_tokens=64, model=smollm2)
    # reconstruction: the first 40 held-out keep rows
    held = store.split_mask("heldout")
    x = store.activations(HOOK)[held][:40]
    ref = _brute(sae, x)
    for k in ("fvu", "mse", "cossim", "l2_ratio", "l0", "dead_fraction"):
        assert m[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-9), k
    assert 0 < m["fvu"] < 1
    # downstream: separate forwards, the SAE applied only at keep positions
    toks, keep, pos = split_sequences(store, 1)
    ids = torch.from_numpy(toks.astype(np.int64))
    lm = smollm2.model
    with torch.no_grad():
        clean = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        kp = torch.from_numpy(keep)

        def recon(a, call):
            out = a.clone()
            out[kp] = sae.decode(sae.encode(a[kp]))
            return out

        with hooks(lm, {HOOK: replace_with(recon)}):
            spliced = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    t = ids[0, 1:]
    sel = slice(1, None)  # drop the prediction made from BOS
    ce = lambda lp: float(-lp[sel].gather(-1, t[sel, None]).mean())  # noqa: E731
    kl = float((clean.exp() * (clean - spliced)).sum(-1)[sel].mean())
    assert m["ce_loss_clean"] == pytest.approx(ce(clean), rel=1e-4)
    assert m["ce_loss_sae"] == pytest.approx(ce(spliced), rel=1e-4)
    assert m["kl_div_sae"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert m["ce_spliced_positions"] == int(keep.sum()) < 64  # BOS (and any EOS/outlier) left alone


def test_cli_on_real_store_reports_outliers(real, smollm2, monkeypatch, tmp_path):
    import sae.evaluate as ev
    store, sae_dir = real
    monkeypatch.setattr(ev, "load_store_model", lambda st, device="cpu": smollm2)
    out = tmp_path / "e.json"
    assert dispatch(["eval", str(sae_dir), "--store", store.path, "--tokens", "0", "--ce-tokens", "256",
                     "--quiet", "--wandb", "disabled", "--out", str(out), "--min-sequences", "4"]) == 0
    m = json.loads(out.read_text())["metrics"]
    for k in ("fvu", "with_outliers_fvu", "all_rows_fvu", "ce_loss_score", "kl_div_score"):
        assert m[k + "_ci95"][0] <= m[k] <= m[k + "_ci95"][1], k
    assert m["n_rows"] == int(store.split_mask("heldout").sum())
    assert m["outlier_threshold"] > 0 and m["with_outliers_n_rows"] == m["n_rows"] + m["n_outlier_rows"]
    assert m["all_rows_n_rows"] == int(store.heldout().sum())
    assert 0 <= m["n_outlier_rows_at_pos0"] <= m["n_outlier_rows"]
    for k in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_score", "kl_div_sae", "kl_div_score"):
        assert np.isfinite(m[k]), k


@pytest.mark.slow
def test_full_suite_writes_intervals_probing_absorption_and_report(real, smollm2, monkeypatch, tmp_path, capsys):
    import sae.evaluate as ev
    store, sae_dir = real
    monkeypatch.setattr(ev, "load_store_model", lambda st, device="cpu": smollm2)
    out = tmp_path / "e.json"
    assert dispatch(["eval", str(sae_dir), "--store", store.path, "--suite", "full", "--probe-windows", "48",
                     "--probe-context", "32", "--absorption-words", "1500", "--ce-tokens", "256", "--min-sequences",
                     "4", "--bootstrap", "200", "--quiet", "--wandb", "disabled", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "±" in printed and "probe on top-1 SAE latents" in printed
    res = json.loads(out.read_text())
    m = res["metrics"]
    for k in ("fvu", "cossim", "l0", "ce_loss_score", "kl_div_sae", "probe_mean_raw_acc", "probe_mean_top1_acc",
              "absorption_full_absorption_rate", "absorption_absorption_fraction"):
        lo, hi = m[k + "_ci95"]
        assert lo <= m[k] <= hi, k
    tasks = res["probing"]["tasks"]
    for name in ("corpus", "digit", "capital", "first_letter"):
        assert 0.5 < tasks[name]["raw_acc"] <= 1 and "top20_acc_ci95" in tasks[name], name
    assert tasks["corpus"]["raw_acc"] > 0.8  # python-docs vs wikitext is easy for the raw activations
    ab = res["absorption"]
    assert len(ab["letters"]) >= 3 and all(0 <= r["full_absorption_rate"] <= 1 for r in ab["letters"].values())
    assert set(res["timings"]) >= {"load_model", "reconstruction", "ce_kl", "probe_activations", "probing",
                                   "absorption_activations", "absorption", "report"}
    report = (tmp_path / "eval_report.md").read_text()
    assert "±" in report and "## Sparse probing" in report and "## Feature absorption" in report
    assert {p.name for p in (tmp_path / "eval_plots").iterdir()} == {"probing_vs_k.png", "absorption_letters.png",
                                                                    "latent_density.png"}

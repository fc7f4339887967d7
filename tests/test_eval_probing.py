"""Sparse probing against known answers: a label planted in one SAE latent is found by the top-1
latent and probed near perfectly, random labels stay at chance; built-in task labels read off text;
task files without labels or with one class get one clear line and exit 2."""
import json

import numpy as np
import pytest
import torch

from saeforge.cli import dispatch
from saeforge.errors import UserError
from sae.absorption import encode_rows
from sae.architectures import ArchConfig, build_sae
from sae.bootstrap import BootstrapSpec
from sae.io import save_sae
from sae.probe_data import code_prose_chars
from sae.probe_tasks import ProbeTask, builtin_tasks, read_task_file
from sae.probing import Features, ProbeLimits, mean_over_tasks, probe_task
from sae.synthetic import write_synthetic_store

D, WINDOW = 32, 16


@pytest.fixture(scope="module")
def planted():
    """Rows = non-negative sparse codes on an orthonormal dictionary; the SAE is that dictionary."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0].T
    codes = (rng.random((6400, D)) < 0.15) * rng.exponential(1.0, (6400, D))
    x = (codes @ basis + 0.05 * rng.standard_normal((6400, D))).astype(np.float32)
    sae = build_sae(ArchConfig("relu", D, D)).eval()
    with torch.no_grad():
        sae.enc.copy_(torch.from_numpy(basis).float())
        sae.W_dec.copy_(torch.from_numpy(basis).float())
        sae.b_enc.fill_(-0.1)
        sae.b_dec.zero_()
    feats = Features(x, encode_rows(sae, x))
    return codes, feats


def _task(labels, name="t"):
    idx = np.arange(len(labels))
    return ProbeTask(name, "token", ["no", "yes"], idx, labels.astype(np.int64), idx // WINDOW)


def test_planted_label_is_found_by_the_top_latent(planted):
    codes, feats = planted
    j = 11
    res, _ = probe_task(_task(codes[:, j] > 0.3), feats, seed=0, ci=BootstrapSpec(300, 0, 20))
    assert res["latents"]["top1"] == [j]
    assert res["top1_acc"] > 0.97 and res["raw_acc"] > 0.9
    lo, hi = res["top1_acc_ci95"]
    assert lo <= res["top1_acc"] <= hi and hi - lo < 0.05
    assert res["n_test_windows"] >= 100


def test_random_labels_stay_at_chance(planted):
    _, feats = planted
    labels = np.random.default_rng(5).random(len(feats.raw)) < 0.5
    res, _ = probe_task(_task(labels), feats, seed=0, ci=BootstrapSpec(300, 0, 20))
    for v in ("raw", "top1", "top20"):
        lo, hi = res[f"{v}_acc_ci95"]
        assert abs(res[f"{v}_acc"] - 0.5) < 0.07 and lo < 0.55 and hi > 0.45, v


def test_many_class_task_averages_one_vs_rest_and_mean_over_tasks(planted):
    codes, feats = planted
    labels = np.argmax(codes[:, :3], axis=1)  # which of latents 0–2 is largest; rows with none → class 0
    labels[codes[:, :3].max(1) == 0] = -1
    keep = labels >= 0
    idx = np.flatnonzero(keep)
    task = ProbeTask("argmax", "token", ["a", "b", "c"], idx, labels[keep], idx // WINDOW)
    lim = ProbeLimits(ks=(1, 2))
    res, probs = probe_task(task, feats, seed=0, lim=lim, ci=BootstrapSpec(200, 0, 20))
    assert set(res["per_class"]) == {"a", "b", "c"} and len(probs) == 3
    assert res["per_class"]["b"]["latents"]["top1"] == [1]
    assert res["top1_acc"] == pytest.approx(np.mean([r["top1_acc"] for r in res["per_class"].values()]))
    other, oprobs = probe_task(_task(codes[:, 7] > 0.3), feats, seed=0, lim=lim)
    mean = mean_over_tasks({"argmax": (res, probs, "pool"), "seven": (other, oprobs, "pool")}, lim.ks,
                           BootstrapSpec(200, 0, 20))
    assert mean["top1_acc"] == pytest.approx((res["top1_acc"] + other["top1_acc"]) / 2)
    assert mean["top1_acc_ci95"][0] <= mean["top1_acc"] <= mean["top1_acc_ci95"][1]


def test_builtin_labels_read_off_the_text():
    pieces = [["", " The", " 42", " cats", " x3", "Hello"], ["", ">>>", " print", "(", "1", ")"]]
    code = np.array([[-1, 0, 0, 0, 0, 0], [-1, -1, 1, 1, 1, 1]])
    valid = np.ones((2, 6), dtype=bool)
    valid[:, 0] = False
    tasks = {t.name: t for t in builtin_tasks(["corpus", "code", "digit", "capital", "first_letter"], pieces,
                                              np.array([1, 0]), code, valid, ("python-docs", "prose"))}
    flat = [p for row in pieces for p in row]
    lab = lambda t: {flat[i].strip(): t.classes[c] for i, c in zip(t.index, t.labels)}  # noqa: E731
    assert lab(tasks["digit"]) == {"The": "letters", "42": "digits", "cats": "letters", "Hello": "letters",
                                   "print": "letters", "1": "digits"}
    assert lab(tasks["capital"]) == {"The": "capitalised", "cats": "lower case", "Hello": "capitalised",
                                     "print": "lower case"}
    assert lab(tasks["first_letter"])["cats"] == "c" and "x3" not in lab(tasks["first_letter"])
    assert lab(tasks["code"])["print"] == "code" and lab(tasks["code"])["cats"] == "prose"
    assert list(tasks["corpus"].labels) == [1, 0] and tasks["corpus"].level == "sequence"
    assert list(tasks["digit"].groups) == [0, 0, 0, 0, 1, 1]  # the window each token came from


def test_doctest_statements_are_code_and_long_lines_prose():
    text = "Return the sum of the values in the list given here.\n>>> sum([1, 2])\n3\n| a | b |\n"
    c = code_prose_chars(text)
    line2 = text.index(">>> ") + 4
    assert (c[: text.index("\n")] == 0).all()
    assert (c[line2:line2 + len("sum([1, 2])")] == 1).all() and c[line2 - 2] == -1
    assert (c[text.index("\n3\n") + 1] == -1) and (c[text.index("|")] == -1)


@pytest.mark.parametrize("lines,msg", [
    ([{"text": "a b c"}, {"text": "d e", "label": 1}], "line 1 has no \"label\""),
    ([{"text": f"t{i}", "label": "x"} for i in range(12)], "at least two classes"),
    ([{"text": f"t{i}", "label": i % 2} for i in range(12)], "fewer than 10 examples"),
    (["not json"], "line 1 is not JSON"),
])
def test_bad_task_files_are_one_clear_line(tmp_path, lines, msg, capsys):
    f = tmp_path / "task.jsonl"
    f.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    with pytest.raises(UserError, match=msg):
        read_task_file(str(f))
    # through the CLI: exit 2, one line, before any model is loaded (the synthetic store has no model)
    st = write_synthetic_store(str(tmp_path / "s.zarr"), n_tokens=4096, d=16, n_features=64, active=3,
                               context=64, shard_rows=1024, heldout_every=2)
    sae = build_sae(ArchConfig("topk", 16, 64, k=3), generator=torch.Generator().manual_seed(0)).eval()
    d = save_sae(sae, tmp_path / "sae", meta={"hook_point": st.hooks[0], "model": st.model_spec,
                                              "model_hash": st.model_hash, "store": st.path})
    assert dispatch(["eval", str(d), "--suite", "full", "--probe-tasks", str(f), "--quiet", "--wandb",
                     "disabled"]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


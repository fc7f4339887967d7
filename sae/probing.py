"""Sparse probing: logistic-regression probes on raw activations and on the top-k SAE latents.

Per task (`sae.probe_tasks`), as SAEBench does it: windows are split into train and test; each
binary problem (a two-class task, or one class against the rest of a many-class task) gets
class-balanced train and test sets; a probe (scikit-learn LogisticRegression, L2, C = 1, on
standardised features) is fitted on the raw activations, and on the k SAE latents whose mean
activation differs most between the classes on the training split, for each k in KS. Accuracy is
measured on the held-out test split; a many-class task reports the mean over its classes.

Intervals resample the test windows (cluster bootstrap, `sae.bootstrap`); the selected latents
and fitted probes stay fixed, so an interval covers the test-set noise of the reported accuracy.

    feats = Features(raw=acts [N, d], latents=CSR [N, d_sae])
    result, units = probe_task(task, feats, seed=0)
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from sae.bootstrap import CI_SUFFIX, BootstrapSpec, add_intervals, enough_units
from sae.probe_tasks import ProbeTask

log = logging.getLogger(__name__)

KS = (1, 2, 5, 20)


@dataclass
class Features:
    """Rows a task's `index` points into: raw activations [N, d] and SAE latents [N, d_sae] (CSR or dense)."""
    raw: np.ndarray
    latents: Any


@dataclass
class ProbeLimits:
    """Split and size limits of one probing run."""
    test_fraction: float = 0.3
    max_train_per_class: int = 2000
    max_test_per_class: int = 500
    min_train_per_class: int = 20
    min_test_per_class: int = 10
    ks: tuple[int, ...] = KS


def fit_probe(x: np.ndarray, y: np.ndarray, class_weight: str | None = None) -> Any:
    """Standardise, then L2 logistic regression (C = 1, lbfgs, up to 1000 iterations)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def raw_direction(model: Any) -> np.ndarray:
    """The probe's weight vector in raw-input units (coef / feature scale of the standardiser)."""
    scaler, lr = model.steps[0][1], model.steps[-1][1]
    return lr.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)


def dense_rows(m: Any, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """m[rows][:, cols] as a dense float32 array, for CSR or dense m."""
    sub = m[rows]
    if cols is not None:
        sub = sub[:, cols]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)


def mean_difference(latents: Any, rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|mean over positives − mean over negatives| of every latent on the given rows."""
    pos, neg = latents[rows[y == 1]], latents[rows[y == 0]]
    return np.abs(np.asarray(pos.mean(0)).ravel() - np.asarray(neg.mean(0)).ravel())


def test_split(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per example: whether its group (window) is in the seeded test share of groups."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    test = set(uniq[rng.random(len(uniq)) < fraction].tolist())
    return np.fromiter((g in test for g in groups), dtype=bool, count=len(groups))


def _balanced(pos: np.ndarray, neg: np.ndarray, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(pos), len(neg), cap)
    return rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)


@dataclass
class _Problem:
    """One binary problem's held-out correctness per probe variant ("raw", "top1", …), by test example."""
    name: str
    test_rows: np.ndarray
    groups: np.ndarray
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    latents: dict[str, list[int]] = field(default_factory=dict)
    n_train: int = 0


def _binary_problem(name: str, feats: Features, idx: np.ndarray, groups: np.ndarray, y: np.ndarray,
                    is_test: np.ndarray, lim: ProbeLimits, rng: np.random.Generator) -> _Problem | None:
    tr_p, tr_n = _balanced(np.flatnonzero(~is_test & (y == 1)), np.flatnonzero(~is_test & (y == 0)),
                           lim.max_train_per_class, rng)
    te_p, te_n = _balanced(np.flatnonzero(is_test & (y == 1)), np.flatnonzero(is_test & (y == 0)),
                           lim.max_test_per_class, rng)
    if len(tr_p) < lim.min_train_per_class or len(te_p) < lim.min_test_per_class:
        return None
    tr, te = np.concatenate([tr_p, tr_n]), np.concatenate([te_p, te_n])
    ytr, yte = y[tr], y[te]
    prob = _Problem(name, idx[te], groups[te], n_train=len(tr))
    raw = fit_probe(dense_rows(feats.raw, idx[tr]), ytr)
    prob.correct["raw"] = raw.predict(dense_rows(feats.raw, idx[te])) == yte
    order = np.argsort(-mean_difference(feats.latents, idx[tr], ytr), kind="stable")
    for k in lim.ks:
        cols = np.sort(order[:k])
        m = fit_probe(dense_rows(feats.latents, idx[tr], cols), ytr)
        prob.correct[f"top{k}"] = m.predict(dense_rows(feats.latents, idx[te], cols)) == yte
        prob.latents[f"top{k}"] = [int(c) for c in order[:k]]
    return prob


def _accuracy_figures(problems: list[_Problem], variants: list[str], unit_of: dict[Any, int]) -> tuple[
        np.ndarray, Any]:
    """Per-unit (correct, n) sums of every problem × variant, and the function giving the mean accuracy
    over problems of each variant from resampled sums."""
    cols = []
    for p in problems:
        u = np.array([unit_of[g] for g in p.groups])
        for v in variants:
            vals = np.stack([p.correct[v].astype(np.float64), np.ones(len(u))], 1)
            full = np.zeros((len(unit_of), 2))
            np.add.at(full, u, vals)
            cols.append(full)
    units = np.concatenate(cols, 1)
    nv = len(variants)

    def figures(sums: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = (sums[:, 0::2] / sums[:, 1::2]).reshape(len(sums), len(problems), nv)
        return {f"{v}_acc": np.nanmean(acc[:, :, j], axis=1) for j, v in enumerate(variants)}

    return units, figures


def probe_task(task: ProbeTask, feats: Features, seed: int = 0, lim: ProbeLimits | None = None,
               ci: BootstrapSpec | None = None) -> tuple[dict[str, Any], list[_Problem]]:
    """Accuracy of the raw probe and of the top-k latent probes on one task, with intervals."""
    lim = lim or ProbeLimits()
    rng = np.random.default_rng(seed)
    is_test = test_split(task.groups, lim.test_fraction, seed)
    binary = len(task.classes) == 2
    problems: list[_Problem] = []
    skipped: list[str] = []
    for c in ([1] if binary else range(len(task.classes))):
        y = (task.labels == c).astype(np.int64)
        p = _binary_problem(task.classes[c], feats, task.index, task.groups, y, is_test, lim, rng)
        (problems.append(p) if p is not None else skipped.append(task.classes[c]))
    variants = ["raw", *(f"top{k}" for k in lim.ks)]
    out: dict[str, Any] = {"level": task.level, "classes": task.classes if binary else
                           [p.name for p in problems], "n_problems": len(problems)}
    if skipped and not binary:
        out["skipped_classes"] = skipped
    if not problems:
        out["error"] = (f"too few examples (needs >= {lim.min_train_per_class} train and {lim.min_test_per_class} "
                        f"test per class)")
        return out, problems
    out["n_train"] = int(sum(p.n_train for p in problems))
    out["n_test"] = int(sum(len(p.test_rows) for p in problems))
    for v in variants:
        out[f"{v}_acc"] = float(np.mean([p.correct[v].mean() for p in problems]))
    if binary:
        out["latents"] = problems[0].latents
    else:
        out["per_class"] = {p.name: {f"{v}_acc": float(p.correct[v].mean()) for v in variants} | {
            "latents": p.latents} for p in problems}
    test_groups = np.unique(np.concatenate([p.groups for p in problems]))
    out["n_test_windows"] = int(len(test_groups))
    if ci is not None and enough_units(len(test_groups), ci, f"probing task {task.name!r}",
                                       "raise --probe-windows (or add examples to the task file)"):
        units, figures = _accuracy_figures(problems, variants, {g: i for i, g in enumerate(test_groups)})
        add_intervals(out, units, figures, ci)
    return out, problems


def mean_over_tasks(results: dict[str, tuple[dict[str, Any], list[_Problem], str]], ks: tuple[int, ...],
                    ci: BootstrapSpec | None) -> dict[str, Any]:
    """Mean accuracy over tasks of each probe variant; intervals resample the union of test windows
    jointly (tasks on one pool share windows)."""
    variants = ["raw", *(f"top{k}" for k in ks)]
    done = {n: r for n, r in results.items() if r[1]}
    out: dict[str, Any] = {"tasks": sorted(done)}
    if not done:
        return out
    for v in variants:
        out[f"{v}_acc"] = float(np.mean([r[0][f"{v}_acc"] for r in done.values()]))
    keyed = [((src, g), n) for n, (_, probs, src) in done.items() for p in probs for g in p.groups]
    unit_of = {k: i for i, k in enumerate(dict.fromkeys(k for k, _ in keyed))}
    if ci is None or not enough_units(len(unit_of), ci, "probing", "raise --probe-windows"):
        return out
    cols, parts = [], []
    for n, (_, probs, src) in done.items():
        shifted = [_Problem(p.name, p.test_rows, np.array([unit_of[(src, g)] for g in p.groups]), p.correct)
                   for p in probs]
        u, f = _accuracy_figures(shifted, variants, {i: i for i in range(len(unit_of))})
        cols.append(u)
        parts.append((u.shape[1], f))

    def figures(sums: np.ndarray) -> dict[str, np.ndarray]:
        at, per_task = 0, []
        for width, f in parts:
            per_task.append(f(sums[:, at:at + width]))
            at += width
        return {f"{v}_acc": np.mean([t[f"{v}_acc"] for t in per_task], axis=0) for v in variants}

    add_intervals(out, np.concatenate(cols, 1), figures, ci)
    return out


def flat_probe_metrics(tasks: dict[str, dict[str, Any]], mean: dict[str, Any]) -> dict[str, Any]:
    """Headline scalars for eval.json's flat metrics: probe_<task>_<variant>_acc (+ _ci95), probe_mean_…."""
    out: dict[str, Any] = {}
    for scope, d in [*((f"probe_{n}_", r) for n, r in tasks.items()), ("probe_mean_", mean)]:
        for k, v in d.items():
            if k.endswith("_acc") or k.endswith("_acc" + CI_SUFFIX):
                out[scope + k] = v
    return out


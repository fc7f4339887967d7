"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"), with the
definitions and thresholds of SAEBench's absorption eval.

Inputs are the activations on single-token words from the model's vocabulary (`sae.probe_data`),
split into train and test words. Per letter:

1. a linear probe (logistic regression, class-balanced, one letter against the rest) on the raw
   activations; letters whose probe has test F1 < 0.6 are not evaluated;
2. the letter's main SAE latents: latents ranked by the difference of their mean activation on
   the letter's train words and on the others; k-sparse probes on the top k = 1…10 latents; the
   main latents are the top k for the largest k whose F1 still rose by more than 0.03 over k − 1
   (so a split feature counts as main, not as absorption);
3. on every test word of the letter that the probe classifies correctly (a true positive), with p
   the probe's unit direction in raw units, a = x·p, and each latent's projection f_i·(W_dec,i·p):
   - full absorption: no main latent fires, the latent with the largest projection has
     cos(W_dec,i, p) ≥ 0.025, a > 0, and that projection is ≥ 0.4·a;
   - absorption fraction: with M the main latents' total projection and A the total of the top 3
     other latents with cos ≥ 0.1 and positive projection: 0 if M ≥ a or A < 0.4·a; 1 if M ≤ 0;
     else min(A, a − M) / (min(A, a − M) + M).

Reported per letter and as the mean over letters: the full-absorption rate (absorbed true
positives / true positives) and the mean absorption fraction. Letters with fewer than
`min_true_positives` true positives are left out. Intervals resample the test words.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sae.architectures import SAE
from sae.bootstrap import BootstrapSpec, add_intervals, enough_units
from sae.probing import dense_rows, fit_probe, raw_direction

log = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = re.compile(r"^ ?[A-Za-z]+$")


@dataclass(frozen=True)
class AbsorptionThresholds:
    """SAEBench's defaults."""
    min_probe_f1: float = 0.6
    max_k: int = 10
    f1_jump: float = 0.03
    full_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_share: float = 0.4
    max_absorbing: int = 3
    min_true_positives: int = 10


def vocabulary_words(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, text) of every token that is letters only, with or without one leading space."""
    out = []
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i])
        if _ALPHA.match(t):
            out.append((i, t))
    return out


def first_letter(word: str) -> int:
    return LETTERS.index(word.strip()[0].lower())


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    return 2 * tp / max(float(pred.sum() + y.sum()), 1.0)


@torch.no_grad()
def encode_rows(sae: SAE, x: np.ndarray, batch: int = 2048) -> sp.csr_matrix:
    """SAE latents of raw rows as a sparse CSR matrix [n, d_sae]."""
    dev = next(sae.parameters()).device
    parts = []
    for s in range(0, len(x), batch):
        f = sae.encode(torch.from_numpy(x[s:s + batch]).to(dev)).float().cpu()
        r, c = f.nonzero(as_tuple=True)
        parts.append(sp.csr_matrix((f[r, c].numpy(), (r.numpy(), c.numpy())), shape=tuple(f.shape)))
    return sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, sae.cfg.d_sae), dtype=np.float32)


def main_latents(z_tr: Any, y_tr: np.ndarray, z_te: Any, y_te: np.ndarray, th: AbsorptionThresholds) -> tuple[
        list[int], list[float]]:
    """The letter's main latents by k-sparse probing (see the module doc) and the F1 of each k."""
    rows = np.arange(z_tr.shape[0])
    diff = np.asarray(z_tr[rows[y_tr]].mean(0)).ravel() - np.asarray(z_tr[rows[~y_tr]].mean(0)).ravel()
    order = np.argsort(-diff, kind="stable")[: th.max_k]
    best, main, f1s = -np.inf, [], []
    for k in range(1, len(order) + 1):
        cols = np.sort(order[:k])
        m = fit_probe(dense_rows(z_tr, rows, cols), y_tr, class_weight="balanced")
        f1 = _f1(m.predict(dense_rows(z_te, np.arange(z_te.shape[0]), cols)).astype(bool), y_te)
        f1s.append(f1)
        if f1 > best + th.f1_jump:
            best, main = f1, [int(i) for i in order[:k]]
        else:
            break
    return main, f1s


def word_absorption(x: np.ndarray, z: Any, probe_dir: np.ndarray, w_dec: np.ndarray, main: list[int],
                    th: AbsorptionThresholds) -> tuple[np.ndarray, np.ndarray]:
    """(absorption fraction, full absorption) of each row of x (raw activations) with latents z."""
    p = probe_dir / np.linalg.norm(probe_dir)
    dec_p = w_dec @ p  # each latent's decoder along the probe
    cos = dec_p / np.maximum(np.linalg.norm(w_dec, axis=1), 1e-12)
    a = x @ p
    frac, full = np.zeros(len(x)), np.zeros(len(x), dtype=bool)
    is_main = np.zeros(len(w_dec), dtype=bool)
    is_main[main] = True
    for i in range(len(x)):
        f = np.asarray(z[i].toarray()).ravel() if sp.issparse(z) else np.asarray(z[i])
        proj = f * dec_p
        m = float(proj[is_main].sum())
        cand = proj[(~is_main) & (cos >= th.fraction_cos) & (proj > 0)]
        top = float(np.sort(cand)[::-1][: th.max_absorbing].sum()) if len(cand) else 0.0
        if m >= a[i] or top < th.projection_share * a[i]:
            frac[i] = 0.0
        elif m <= 0:
            frac[i] = 1.0
        else:
            absorbed = min(top, a[i] - m)
            frac[i] = float(np.clip(absorbed / (absorbed + m), 0, 1))
        j = int(np.argmax(proj))
        full[i] = bool((f[is_main] <= 1e-8).all() and cos[j] >= th.full_cos and a[i] > 0
                       and proj[j] >= th.projection_share * a[i])
    return frac, full


def absorption(sae: SAE, x_tr: np.ndarray, letters_tr: np.ndarray, x_te: np.ndarray, letters_te: np.ndarray,
               th: AbsorptionThresholds | None = None, ci: BootstrapSpec | None = None) -> dict[str, Any]:
    """First-letter absorption of `sae` on train/test word activations with their first letters (0–25)."""
    th = th or AbsorptionThresholds()
    z_tr, z_te = encode_rows(sae, x_tr), encode_rows(sae, x_te)
    w_dec = sae.W_dec.detach().float().cpu().numpy()
    per: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    cols: list[np.ndarray] = []  # per test word: (fraction, full, true positive) for each evaluated letter
    for li, letter in enumerate(LETTERS):
        ytr, yte = letters_tr == li, letters_te == li
        if ytr.sum() < 2 or yte.sum() < 1:
            skipped[letter] = "no words"
            continue
        probe = fit_probe(x_tr, ytr.astype(np.int64), class_weight="balanced")
        pred = probe.decision_function(x_te) > 0
        f1 = _f1(pred, yte)
        tp = pred & yte
        if f1 < th.min_probe_f1:
            skipped[letter] = f"probe F1 {f1:.2f} < {th.min_probe_f1}"
            continue
        if tp.sum() < th.min_true_positives:
            skipped[letter] = f"{int(tp.sum())} true positives < {th.min_true_positives}"
            continue
        main, f1s = main_latents(z_tr, ytr, z_te, yte, th)
        idx = np.flatnonzero(tp)
        frac, full = word_absorption(x_te[idx], z_te[idx], raw_direction(probe), w_dec, main, th)
        col = np.zeros((len(x_te), 3))
        col[idx, 0], col[idx, 1], col[idx, 2] = frac, full, 1.0
        cols.append(col)
        per[letter] = {"full_absorption_rate": float(full.mean()), "absorption_fraction": float(frac.mean()),
                       "n_true_positives": int(len(idx)), "probe_f1": f1, "main_latents": main,
                       "k_sparse_f1": f1s, "n_absorbed": int(full.sum())}
    out: dict[str, Any] = {"letters": per, "skipped_letters": skipped, "n_train_words": int(len(x_tr)),
                           "n_test_words": int(len(x_te))}
    if not per:
        return out
    out["full_absorption_rate"] = float(np.mean([v["full_absorption_rate"] for v in per.values()]))
    out["absorption_fraction"] = float(np.mean([v["absorption_fraction"] for v in per.values()]))
    out["mean_main_latents"] = float(np.mean([len(v["main_latents"]) for v in per.values()]))
    if ci is not None and enough_units(len(x_te), ci, "the absorption test words", "raise --absorption-words"):
        names = list(per)

        def figures(sums: np.ndarray) -> dict[str, np.ndarray]:
            s = sums.reshape(len(sums), len(names), 3)
            with np.errstate(divide="ignore", invalid="ignore"):
                fr, fu = s[:, :, 0] / s[:, :, 2], s[:, :, 1] / s[:, :, 2]
            res = {"absorption_fraction": np.nanmean(fr, 1), "full_absorption_rate": np.nanmean(fu, 1)}
            for j, n in enumerate(names):
                res[f"letter_{n}_absorption_fraction"], res[f"letter_{n}_full_absorption_rate"] = fr[:, j], fu[:, j]
            return res

        add_intervals(out, np.concatenate(cols, 1), figures, ci)
        for n in names:  # per-letter intervals go beside the per-letter figures
            for k in ("absorption_fraction", "full_absorption_rate"):
                per[n][f"{k}_ci95"] = out.pop(f"letter_{n}_{k}_ci95")
    return out

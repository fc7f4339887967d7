"""The model-dependent parts of `saeforge eval --suite full`: sparse probing and feature absorption.

The model's activations on the probing windows and on the vocabulary words do not depend on the
SAE, so they are computed once per (model, hook) and shared by every SAE of one command
(`ProbePool`, `WordPool`); each SAE then only encodes them and fits its probes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from saeforge.errors import UserError
from sae.absorption import AbsorptionThresholds, absorption, encode_rows, first_letter, vocabulary_words
from sae.architectures import SAE
from sae.bootstrap import BootstrapSpec
from sae.probe_data import hook_activations, text_windows, word_activations
from sae.probe_tasks import BUILTIN_TASKS, ProbeTask, builtin_tasks, file_task, read_task_file
from sae.probing import Features, ProbeLimits, flat_probe_metrics, mean_over_tasks, probe_task

if TYPE_CHECKING:
    from sae.eval_run import EvalConfig

log = logging.getLogger(__name__)

DEFAULT_PROSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
ICL_TEMPLATE = "{word} has the first letter:{answer}\n"  # SAEBench's template, one line per example


def prose_corpus(spec: str) -> str:
    if spec:
        return spec
    if DEFAULT_PROSE.is_file():
        return str(DEFAULT_PROSE)
    raise UserError(f"no prose corpus for the probing tasks (the default {DEFAULT_PROSE} is missing); pass "
                    f"--prose-corpus FILE.txt (any corpus `saeforge collect` accepts)")


@dataclass
class _Windows:
    acts: np.ndarray  # [W, T, d]
    valid: np.ndarray  # [W, T] tokens that may be examples (not BOS/padding, norm within the outlier bound)


@dataclass
class ProbePool:
    """Activations of the probing windows and the tasks read off them."""
    windows: dict[str, _Windows]  # "pool" and one entry per task file
    tasks: list[ProbeTask]
    seconds: float


def _valid(acts: np.ndarray, real: np.ndarray, bound: float | None) -> np.ndarray:
    v = real.copy()
    v[:, 0] = False  # BOS
    if bound is not None:
        v &= np.linalg.norm(acts, axis=-1) <= bound
    return v


def build_probe_pool(model: Any, hook: str, cfg: "EvalConfig", bound: float | None) -> ProbePool:
    """Windows from python-docs and the prose corpus (built-in tasks) and from each task file."""
    from collect.corpus import load_documents
    t0 = time.perf_counter()
    tok, T = model.tokenizer, cfg.probe_context
    names = [t for t in cfg.probe_tasks if t in BUILTIN_TASKS]
    files = [t for t in cfg.probe_tasks if t not in BUILTIN_TASKS]
    parsed = [read_task_file(f) for f in files]  # bad task files fail before any model time is spent
    windows: dict[str, _Windows] = {}
    tasks: list[ProbeTask] = []
    if names:
        sources = ("python-docs", "prose")
        docs = load_documents("python-docs")["text"]
        prose = load_documents(prose_corpus(cfg.prose_corpus))["text"]
        id_parts: list[np.ndarray] = []
        pieces: list[Any] = []
        code: list[np.ndarray] = []
        source: list[np.ndarray] = []
        for s, texts in enumerate((docs, prose)):
            i, p, c = text_windows(texts, tok, T, cfg.probe_windows, cfg.seed + s, label_code=(s == 0))
            id_parts.append(i)
            pieces.extend(p)
            code.append(c)
            source.append(np.full(len(i), s))
        all_ids = np.concatenate(id_parts)
        acts = hook_activations(model.model, all_ids, hook, quiet=cfg.quiet)
        valid = _valid(acts, np.ones(all_ids.shape, dtype=bool), bound)
        windows["pool"] = _Windows(acts, valid)
        tasks += builtin_tasks(names, pieces, np.concatenate(source), np.concatenate(code), valid, sources)
    for name, texts, labels in parsed:
        enc = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = np.full((len(texts), T), tok.pad_token_id or 0, dtype=np.int64)
        real = np.zeros((len(texts), T), dtype=bool)
        for r, e in enumerate(enc):
            row = [bos, *e[: T - 1]]
            ids[r, :len(row)], real[r, :len(row)] = row, True
        acts = hook_activations(model.model, ids, hook, attention_mask=real.astype(np.int64), quiet=cfg.quiet)
        valid = _valid(acts, real, bound)
        if not valid.any(1).all():
            bad = int(np.flatnonzero(~valid.any(1))[0]) + 1
            raise UserError(f"{name}: example {bad} has no token to probe (empty after the BOS token, or only "
                            f"norm outliers); give every line some text")
        windows[name] = _Windows(acts, valid)
        tasks.append(file_task(name, labels))
    return ProbePool(windows, tasks, time.perf_counter() - t0)


def _features(sae: SAE, pool: ProbePool, source: str, level: str, cache: dict[str, Any]) -> Features:
    """Token features (every token; latents zero where not valid) or mean-pooled window features.
    `cache` holds the source's latents so both levels encode the windows once."""
    w = pool.windows[source]
    W, T, d = w.acts.shape
    rows = np.flatnonzero(w.valid.reshape(-1))
    if source not in cache:
        z = encode_rows(sae, np.ascontiguousarray(w.acts.reshape(-1, d)[rows]))
        scatter = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, np.arange(len(rows)))),
                                shape=(W * T, len(rows)))
        cache[source] = (scatter @ z).tocsr()
    latents = cache[source]
    if level == "token":
        return Features(w.acts.reshape(-1, d), latents)
    cnt = np.maximum(w.valid.sum(1, keepdims=True), 1).astype(np.float32)
    pool_m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows // T, rows)), shape=(W, W * T))
    raw = (w.acts * w.valid[..., None]).sum(1) / cnt
    return Features(raw.astype(np.float32), np.asarray((pool_m @ latents).todense()) / cnt)


def run_probing(sae: SAE, pool: ProbePool, cfg: "EvalConfig", ci: BootstrapSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(probing section of eval.json, flat headline metrics)."""
    lim = ProbeLimits(ks=tuple(cfg.probe_ks))
    per: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for t in pool.tasks:
        res, probs = probe_task(t, _features(sae, pool, t.features, t.level, cache), seed=cfg.seed, lim=lim, ci=ci)
        per[t.name] = (res, probs, t.features)
    mean = mean_over_tasks(per, lim.ks, ci)
    tasks = {n: r[0] for n, r in per.items()}
    return {"tasks": tasks, "mean": mean}, flat_probe_metrics(tasks, mean)


@dataclass
class WordPool:
    """Activations on single-token vocabulary words after a fixed in-context spelling prefix."""
    x_train: np.ndarray
    letters_train: np.ndarray
    x_test: np.ndarray
    letters_test: np.ndarray
    prefix: str
    seconds: float


def build_word_pool(model: Any, hook: str, cfg: "EvalConfig", bound: float | None, test_fraction: float = 0.2,
                    icl_examples: int = 10) -> WordPool:
    """Sample `cfg.absorption_words` letters-only vocabulary tokens (seeded), split 80/20 into train and test."""
    t0 = time.perf_counter()
    tok = model.tokenizer
    vocab = vocabulary_words(tok)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(vocab))
    icl = [vocab[int(i)][1] for i in order[:icl_examples]]
    chosen = [vocab[int(i)] for i in order[icl_examples:icl_examples + cfg.absorption_words]]
    text = "".join(ICL_TEMPLATE.format(word=w, answer=" " + w.strip()[0].upper()) for w in icl)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    prefix = [bos, *tok(text, add_special_tokens=False)["input_ids"]]
    x = word_activations(model.model, prefix, [i for i, _ in chosen], hook, quiet=cfg.quiet)
    letters = np.array([first_letter(w) for _, w in chosen])
    keep = np.ones(len(x), dtype=bool) if bound is None else np.linalg.norm(x, axis=1) <= bound
    x, letters = x[keep], letters[keep]
    test = rng.random(len(x)) < test_fraction
    return WordPool(x[~test], letters[~test], x[test], letters[test], text, time.perf_counter() - t0)


def run_absorption(sae: SAE, words: WordPool, ci: BootstrapSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(absorption section of eval.json, flat headline metrics)."""
    res = absorption(sae, words.x_train, words.letters_train, words.x_test, words.letters_test,
                     AbsorptionThresholds(), ci)
    flat = {f"absorption_{k}": res[k] for k in ("full_absorption_rate", "absorption_fraction") if k in res}
    flat.update({f"absorption_{k}_ci95": res[f"{k}_ci95"] for k in ("full_absorption_rate", "absorption_fraction")
                 if f"{k}_ci95" in res})
    return res, flat

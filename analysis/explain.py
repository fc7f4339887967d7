"""Explanations of latents, written by a language model and scored by detection.

Explaining: the explainer sees a latent's top examples (the tokens where it is most active marked
<<like this>>) and writes one sentence. Scoring follows delphi's detection scorer, one excerpt per
prompt (delphi's `n_examples_shown=1`): a scorer model reads an explanation and a held-out excerpt
— activating (the latent's quantile samples, which the explainer never saw) or not (random store
contexts where the latent is silent on every token) — and says whether the feature is active.
Score = balanced accuracy = (true-positive rate + true-negative rate) / 2, for the LLM explanation
and for the token-list label alike, on the same excerpts.

Decisions: a scorer that gives probabilities (a local model, or an endpoint returning logprobs)
calls "active" the half of the excerpts with the highest P(Yes) (the set is half activating by
construction), which removes a small model's bias towards always answering Yes or No; a scorer that
only answers in words is taken at its word. AUROC of P(Yes) is reported beside it.

Results go to DIR/explanations.jsonl as each batch of latents finishes (a crash keeps them; a rerun
resumes), then to DIR/explanations.json and data/explanations.js for the viewer.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from analysis.dashboard import EXPLANATIONS, EXPLANATIONS_FORMAT, write_explanations_js
from analysis.explain_clients import ChatModel, Conversation
from analysis.features import encode_triples, read_inputs
from analysis.features_io import Reader, fingerprint, load_index
from analysis.labels import label_tokens
from saeforge.errors import UserError
from saeforge.progress import progress
from saeforge.urls import write_json

log = logging.getLogger(__name__)

JSONL = "explanations.jsonl"
MARK_FRACTION = 0.25  # tokens at ≥ this share of the example's max are marked <<…>> for the explainer

EXPLAIN_SYSTEM = ("You study one feature of a language model. You are shown text excerpts where the feature is "
                  "active; the tokens where it is most active are marked like <<this>>. Reply with one short "
                  "sentence saying what the feature responds to, and nothing else.")
DETECT_SYSTEM = ("You check an explanation of a language-model feature. You are given the explanation and one text "
                 "excerpt. Answer Yes if the feature, as explained, is active somewhere in the excerpt; otherwise "
                 "answer No. Answer with one word: Yes or No.")


# ---- prompts ------------------------------------------------------------------------------------

def excerpt(tokens: list[str], values: list[float] | None = None, mark: float = MARK_FRACTION) -> str:
    """The excerpt as plain text; with values, the strongest tokens wrapped in <<…>>."""
    if values is None:
        return "".join(tokens).strip()
    top = max(values) if values else 0.0
    parts = [f"<<{t}>>" if top > 0 and v >= mark * top and t.strip() else t for t, v in zip(tokens, values)]
    return "".join(parts).strip().replace(">><<", "")


PRIME = "The feature fires on words such as"  # a local model continues this reply: small models then answer in form


def explain_prompt(examples: list[dict[str, Any]], prime: bool = False) -> Conversation:
    """The explainer's conversation; with `prime`, the reply is begun for the model to continue."""
    lines = "\n".join(f"{j + 1}. {excerpt(a['tokens'], a['values'])}" for j, a in enumerate(examples))
    marked = Counter(m.strip() for a in examples for m in re.findall(r"<<(.+?)>>", excerpt(a["tokens"], a["values"])))
    common = ", ".join(f'"{t}"' for t, _ in marked.most_common(5) if t)
    conv = [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"Excerpts:\n{lines}\n\nMost often marked: {common}\n\n"
                                        f"In one sentence, what does the feature respond to?"}]
    return conv + [{"role": "assistant", "content": PRIME}] if prime else conv


def detect_prompt(explanation: str, text: str) -> Conversation:
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpt: {text}\n\n"
                                        f"Is the feature active in this excerpt? Answer Yes or No."}]


def clean_explanation(text: str) -> str:
    """The first sentence of a reply, without quotes, list marks or a leading "Answer:"."""
    t = text.strip().split("\n")[0].strip()
    t = re.sub(r"^(answer|explanation|sentence)\s*:\s*", "", t, flags=re.I).strip(" \"'*-")
    m = re.match(r"(.+?[.!?][\"”']?)(\s|$)", t)
    t = m.group(1) if m else t
    return t[:300] or "(no explanation)"


# ---- scoring -------------------------------------------------------------------------------------

def auroc(p: list[float], truth: list[bool]) -> float | None:
    """Area under the ROC curve of scores `p` (ties count half)."""
    pos = [x for x, t in zip(p, truth) if t]
    neg = [x for x, t in zip(p, truth) if not t]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def detection_score(p_yes: list[float | None], truth: list[bool]) -> dict[str, Any]:
    """Balanced accuracy (and AUROC) of a scorer's P(Yes) against which excerpts truly activate."""
    n_pos, n_neg = sum(truth), len(truth) - sum(truth)
    if not n_pos or not n_neg:
        return {"score": None, "auroc": None, "decision": None}
    graded = any(p is not None and 0.0 < p < 1.0 for p in p_yes)
    filled = [0.5 if p is None else float(p) for p in p_yes]
    if graded:  # the half with the highest P(Yes); ties broken by order, unanswered never active
        order = sorted(range(len(filled)), key=lambda j: (-filled[j], j))
        chosen = set(order[:n_pos])
        pred = [j in chosen and p_yes[j] is not None for j in range(len(truth))]
    else:
        pred = [p is not None and p >= 0.5 for p in p_yes]
    # an unanswered excerpt counts as wrong whatever its truth
    ok = [pr == t and p is not None for pr, t, p in zip(pred, truth, p_yes)]
    tpr = sum(o for o, t in zip(ok, truth) if t) / n_pos
    tnr = sum(o for o, t in zip(ok, truth) if not t) / n_neg
    return {"score": (tpr + tnr) / 2, "auroc": auroc(filled, truth), "decision": "top-half" if graded else "answer"}


# ---- non-activating contexts from the store --------------------------------------------------------

@dataclass
class Negatives:
    """Random store contexts (±window tokens) and, per context, the latents active anywhere in it."""
    tokens: list[list[int]]
    active: np.ndarray  # [n_contexts, d_sae] bool
    vocab: list[str] = field(repr=False, default_factory=list)

    def pick(self, latent: int, n: int, seed: int) -> list[str]:
        free = np.flatnonzero(~self.active[:, latent])
        rng = np.random.default_rng([seed, latent])
        take: Any = rng.choice(free, size=min(n, free.size), replace=False) if free.size else []
        return [excerpt([self.vocab[t] if 0 <= t < len(self.vocab) else f"<{t}>" for t in self.tokens[int(j)]])
                for j in take]


@torch.no_grad()
def sample_negatives(doc: dict[str, Any], vocab: list[str], n_contexts: int = 256, seed: int = 0,
                     device: str = "cpu") -> Negatives:
    """`n_contexts` random contexts of the store the features were made from, encoded by their SAE."""
    from collect.store import Store
    from sae.io import dict_points, load_sae
    sae_path, store_path = (doc.get("sae") or {}).get("path"), (doc.get("store") or {}).get("path")
    hooks, _ = dict_points(doc.get("sae") or {})  # a crosscoder's: all
    if not sae_path or not store_path or not hooks:
        raise UserError("features.json records no SAE path, store path or hook point; rerun `saeforge features`")
    sae = load_sae(sae_path, device)
    store = Store.open(store_path)
    split = (doc.get("store") or {}).get("split", "all")
    w = int(doc.get("window") or doc["layout"]["window"])
    d_sae = int(sae.W_dec.shape[0])
    ranges = store.chunk_ranges()
    rng = np.random.default_rng(seed)
    per = max(1, -(-n_contexts // min(len(ranges), 16)))
    toks: list[list[int]] = []
    act_rows: list[np.ndarray] = []
    for ci in rng.permutation(len(ranges))[:16]:
        a, b = ranges[int(ci)]
        mask = store.split_mask(split, a, b)
        if mask.sum() == 0:
            continue
        tokens, seq = store.tokens(a, b), store.seq(a, b)
        x = torch.from_numpy(read_inputs(store, hooks, a, b, mask)).to(sae.W_dec.device)
        r, lat, _ = encode_triples(sae, x)
        rows = np.flatnonzero(mask)[r.cpu().numpy()]
        on = np.zeros((b - a, d_sae), bool)
        on[rows, lat.cpu().numpy()] = True
        for c in rng.choice(np.flatnonzero(mask), size=min(per, int(mask.sum())), replace=False):
            lo, hi = max(0, c - w), min(b - a, c + w + 1)
            keep = np.arange(lo, hi)[seq[lo:hi] == seq[c]]
            toks.append(tokens[keep].tolist())
            act_rows.append(on[keep].any(0))
        if len(toks) >= n_contexts:
            break
    if not toks:
        raise UserError(f"store {store_path!r} has no rows in split {split!r} to draw non-activating contexts from")
    return Negatives(toks[:n_contexts], np.stack(act_rows[:n_contexts]), vocab)


# ---- the run ---------------------------------------------------------------------------------------

def prompts_version() -> str:
    """A hash of the prompts: results made with other prompts are not mixed into one file."""
    import hashlib
    text = "\0".join((EXPLAIN_SYSTEM, PRIME, DETECT_SYSTEM, detect_prompt("E", "X")[-1]["content"],
                      explain_prompt([], False)[-1]["content"]))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclass
class ExplainSettings:
    explainer: str
    scorer: str
    n_shown: int = 10
    n_test: int = 8
    max_new_tokens: int = 40
    seed: int = 0

    def header(self, fp: str) -> dict[str, Any]:
        return {"format": EXPLANATIONS_FORMAT, "features_fingerprint": fp, "prompts": prompts_version(),
                "explainer": self.explainer,
                "scorer": self.scorer, "n_shown": self.n_shown, "n_test": self.n_test,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "method": "detection, one excerpt per prompt; score = balanced accuracy"}


def read_jsonl(path: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(header, finished records by latent) of a results file; a torn last line (crash) is dropped."""
    if not path.is_file():
        return None, {}
    header, done = None, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                log.warning("%s: dropping a torn last line (a crash while writing it)", path)
                continue
            raise UserError(f"{str(path)!r} line {n + 1} is not JSON; delete the file or pass --overwrite") from None
        if n == 0 and "header" in rec:
            header = rec["header"]
        elif "latent" in rec:
            done[int(rec["latent"])] = rec
    return header, done


def _append(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def choose_latents(counts: list[int], latents: list[int] | None, limit: int) -> list[int]:
    """The latents to explain: those asked for, else every latent that fired; the first `limit` of them."""
    n = len(counts)
    if latents:
        bad = [i for i in latents if not 0 <= i < n]
        if bad:
            raise UserError(f"--latents {bad[0]} is out of range: this SAE has {n} latents (0..{n - 1})")
        todo = list(dict.fromkeys(latents))
    else:
        todo = [i for i in range(n) if counts[i] > 0]
    return todo[:limit] if limit > 0 else todo


def finish(out: Path, header: dict[str, Any], done: dict[int, dict[str, Any]]) -> Path:
    """DIR/explanations.json (UTF-8) and data/explanations.js from the finished records."""
    records = [done[i] for i in sorted(done)]
    write_json(str(out / EXPLANATIONS), {**header, "latents": records})
    write_explanations_js(out, records, {k: header.get(k) for k in ("explainer", "scorer", "method")})
    return out / EXPLANATIONS


def explain_latents(out: str | Path, explainer: ChatModel, scorer: ChatModel, settings: ExplainSettings,
                    latents: list[int] | None = None, limit: int = 0, batch: int = 4, overwrite: bool = False,
                    negatives: Negatives | None = None, device: str = "cpu", quiet: bool = True,
                    flush_seconds: float = 60.0) -> dict[int, dict[str, Any]]:
    """Explain and score latents of a features directory, resuming what a previous run finished."""
    out = Path(out)
    reader = Reader(out)
    doc = reader.doc
    fp = fingerprint(doc)
    header = settings.header(fp)
    path = out / JSONL
    cols = load_index(out)["columns"]
    wanted = choose_latents(cols["count"], latents, limit)  # checked before anything is written
    if overwrite and path.exists():
        path.unlink()
    old, done = read_jsonl(path)
    if old is not None and old != header:
        diff = sorted(k for k in header if old.get(k) != header.get(k))
        raise UserError(f"{str(path)!r} was made with other settings ({', '.join(diff)} differ); rerun with the same "
                        f"settings to resume, or pass --overwrite to start again")
    if old is None:
        path.unlink(missing_ok=True)
        _append(path, [{"header": header}])
        done = {}
    todo = [i for i in wanted if i not in done]
    if todo and negatives is None:
        negatives = sample_negatives(doc, reader.vocab, n_contexts=max(256, 8 * settings.n_test), seed=settings.seed,
                                     device=device)
    bar = progress(total=len(todo), desc="explain", unit="latent", quiet=quiet)
    last_flush = time.monotonic()
    for a in range(0, len(todo), batch):
        group = todo[a:a + batch]
        recs = [reader.latent(i) for i in group]
        tops = [[x for x in r["activations"] if x["kind"] == "top"][:settings.n_shown] for r in recs]
        prime = getattr(explainer, "continues", False)
        texts = explainer.generate([explain_prompt(t, prime) for t in tops], settings.max_new_tokens)
        if prime:
            texts = [f"{PRIME} {t.strip()}" for t in texts]
        convs: list[Any] = []
        spans: list[tuple[int, int]] = []
        results: list[dict[str, Any]] = []
        for i, r, t in zip(group, recs, texts):
            pos = [excerpt(x["tokens"]) for x in r["activations"] if x["kind"] == "quantile"][:settings.n_test]
            neg = negatives.pick(i, len(pos), settings.seed) if negatives is not None else []
            pos = pos[:len(neg)]  # equal numbers of each
            tests = pos + neg
            truth = [True] * len(pos) + [False] * len(neg)
            expl = clean_explanation(t)
            label = cols["label"][i]
            lab_text = label_tokens(label)
            start = len(convs)
            convs += [detect_prompt(expl, x) for x in tests] + [detect_prompt(lab_text, x) for x in tests]
            spans.append((start, len(tests)))
            results.append({"latent": i, "explanation": expl, "raw": t.strip()[:500], "label": label,
                            "label_explanation": lab_text, "n_pos": len(pos), "n_neg": len(neg), "truth": truth})
        probs = scorer.yes_prob(convs) if convs else []
        for res, (start, k) in zip(results, spans):
            truth = res.pop("truth")
            e = detection_score(probs[start:start + k], truth)
            lab = detection_score(probs[start + k:start + 2 * k], truth)
            res |= {"score": e["score"], "auroc": e["auroc"], "label_score": lab["score"], "label_auroc": lab["auroc"],
                    "decision": e["decision"], "p_yes": [None if p is None else round(p, 4) for p in probs[start:start + k]],
                    "label_p_yes": [None if p is None else round(p, 4) for p in probs[start + k:start + 2 * k]]}
            done[res["latent"]] = res
        _append(path, results)
        bar.update(len(group))
        if time.monotonic() - last_flush > flush_seconds:
            finish(out, header, done)
            last_flush = time.monotonic()
    bar.close()
    finish(out, header, done)
    return done


def summary(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean scores over the latents that could be scored (both variants on the same excerpts)."""
    both = [r for r in done.values() if r.get("score") is not None and r.get("label_score") is not None]
    if not both:
        return {"n": 0}
    mean = lambda k: float(np.mean([r[k] for r in both if r.get(k) is not None]))  # noqa: E731
    return {"n": len(both), "score": mean("score"), "label_score": mean("label_score"), "auroc": mean("auroc"),
            "label_auroc": mean("label_auroc"),
            "explanation_better": sum(r["score"] > r["label_score"] for r in both),
            "label_better": sum(r["score"] < r["label_score"] for r in both)}


__all__ = ["ExplainSettings", "explain_latents", "detection_score", "auroc", "sample_negatives", "summary",
           "explain_prompt", "detect_prompt", "clean_explanation"]

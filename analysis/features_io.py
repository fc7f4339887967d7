"""The features directory: latent records written once, compactly, for the static viewer and for Python.

    DIR/features.json            meta: SAE, store, model, rates, config, the data layout (plain JSON)
    DIR/data/index.js            saeforge.index({...}): one column per statistic, one entry per latent
    DIR/data/vocab.js            saeforge.vocab([...]): the text of every token id
    DIR/data/shards/NNNNN.js     saeforge.shard(N, "…"): `shard_size` latents per file
    DIR/index.html, viewer.*     the viewer (analysis/viewer/), which loads the .js files above

Data files are JavaScript that registers itself, so the viewer works when opened from file://
(where Chromium refuses fetch() of local files) and when served alike. A shard is a safetensors
buffer (a JSON header + typed arrays; read in JavaScript with a few lines) compressed with zlib and
base64-encoded: token ids, not text or HTML, and the latent's values on every context token as
float16. That is what keeps a latent with 20 top examples and its quantile samples under 4 KB.

Python reads everything back with `load_features`, `load_index`, `load_latent` (a Neuronpedia-style
record: tokens, values, maxValue, maxValueTokenIndex, …).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stn
from analysis.features import FeatureStats
from analysis.labels import LogitTable, make_label
from saeforge.errors import UserError
from saeforge.progress import progress
from saeforge.urls import read_json, write_json

log = logging.getLogger(__name__)

FORMAT = "saeforge-features"
VERSION = 2
DATA = "data"
SHARDS = "data/shards"
SHARD_SIZE = 64
TOP_TOKENS = 3  # most frequent max-activating tokens per latent, for search by token
U16_PAD = 65535
KIND_NONE, KIND_TOP = -1, 0  # ex_kind: -1 empty slot, 0 top example, q+1 quantile q (0 = lowest)
_SHARD_RE = re.compile(r'^saeforge\.shard\((\d+),"([A-Za-z0-9+/=]*)"\);\s*$')


# ---- wrappers: JSON/base64 payloads inside self-registering .js files -----------------------------

def js_call(fn: str, payload: Any) -> str:
    """`saeforge.fn(<JSON>);` — valid JS whose argument is exactly the JSON text."""
    return f"saeforge.{fn}({json.dumps(payload, ensure_ascii=False, separators=(',', ':'))});\n"


def read_js_call(path: str | os.PathLike[str], fn: str) -> Any:
    """The JSON argument of a file written by `js_call`."""
    text = Path(path).read_text(encoding="utf-8")
    head = f"saeforge.{fn}("
    body = text.rstrip()
    if not body.startswith(head) or not body.endswith(");"):
        raise UserError(f"{str(path)!r} is not a saeforge {fn} file; rerun `saeforge features`")
    return json.loads(body[len(head):-2])


def write_text_file(path: Path, text: str) -> None:
    """UTF-8, via a temporary file and a rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def shard_path(out: str | os.PathLike[str], s: int) -> Path:
    return Path(out) / SHARDS / f"{s:05d}.js"


# ---- quantile samples, vectorised --------------------------------------------------------------------

@lru_cache(maxsize=None)
def quantile_template(n: int, n_quantiles: int, per_bin: int) -> tuple[tuple[int, int], ...]:
    """(position in the value-ascending sample, quantile) picks for a latent with `n` samples:
    `min(n_quantiles, n)` equal-count groups, `per_bin` evenly spaced picks in each, highest first."""
    groups = np.array_split(np.arange(n), min(n_quantiles, n))
    out: list[tuple[int, int]] = []
    for q in range(len(groups) - 1, -1, -1):
        g = groups[q]
        picks = g[np.linspace(0, len(g) - 1, min(per_bin, len(g))).round().astype(int)]
        out += [(int(p), q) for p in sorted(set(picks.tolist()), reverse=True)]
    return tuple(out)


def quantile_slots(stats: FeatureStats, n_quantiles: int, per_bin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots [d, Q] into the reservoir buffer or −1, quantile [d, Q], groups used per latent [d])."""
    buf = stats.samples
    valid = (buf.row >= 0).numpy()
    val = np.where(valid, buf.val.numpy(), np.inf)
    order = np.argsort(val, axis=1, kind="stable")
    n = valid.sum(1)
    Q = n_quantiles * per_bin
    slots = np.full((stats.d_sae, Q), -1, np.int64)
    quant = np.full((stats.d_sae, Q), -1, np.int64)
    for m in np.unique(n):
        if m == 0:
            continue
        lat = np.flatnonzero(n == m)
        t = np.array(quantile_template(int(m), n_quantiles, per_bin))
        slots[lat[:, None], np.arange(len(t))] = order[lat[:, None], t[:, 0]]
        quant[lat[:, None], np.arange(len(t))] = t[:, 1]
    return slots, quant, np.minimum(n, n_quantiles)


# ---- labels -------------------------------------------------------------------------------------------

def labels_and_top_tokens(stats: FeatureStats, vocab: list[str], logits: LogitTable | None, n_out: int = 2
                          ) -> tuple[list[str], np.ndarray]:
    """The token-list label of every latent and its `TOP_TOKENS` most frequent max-activating token ids."""
    centre = stats.window
    max_ids = stats.top.tok[:, :, centre].numpy()
    has = (stats.top.row >= 0).numpy() & (max_ids >= 0)
    pos = logits.pos_ids[:, :8].tolist() if logits is not None else None
    labels: list[str] = []
    top = np.full((stats.d_sae, TOP_TOKENS), -1, np.int64)
    V = len(vocab)
    for i in range(stats.d_sae):
        ids = max_ids[i][has[i]].tolist()
        if not ids:
            labels.append("(never fires)")
            continue
        strs = [vocab[t] if 0 <= t < V else f"<{t}>" for t in ids]
        outs = [vocab[t] for t in pos[i] if 0 <= t < V] if pos is not None else []
        labels.append(make_label(strs, outs, n_out=n_out))
        first: dict[int, int] = {}
        for j, t in enumerate(ids):
            first.setdefault(t, j)
        c = Counter(ids)
        best = sorted(c, key=lambda t: (-c[t], first[t]))[:TOP_TOKENS]
        top[i, :len(best)] = best
    return labels, top


# ---- writing --------------------------------------------------------------------------------------------

def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


@dataclass
class Layout:
    n_latents: int
    shard_size: int
    window: int
    top: int
    quantile_slots: int
    token_dtype: str  # "U16" (pad 65535) or "I32" (pad −1)

    @property
    def n_shards(self) -> int:
        return -(-self.n_latents // self.shard_size)


def _shard_tensors(stats: FeatureStats, lay: Layout, a: int, b: int, slots: np.ndarray, quant: np.ndarray,
                   nq: np.ndarray, logits: LogitTable | None) -> dict[str, np.ndarray]:
    """Every array of latents [a, b) (one shard), in numpy (tiny ops: no thread hand-offs)."""
    top, smp = stats.top, stats.samples
    sl = slots[a:b]
    ok = sl >= 0
    g = np.maximum(sl, 0)
    s_tok = np.take_along_axis(smp.tok[a:b].numpy(), g[:, :, None], 1)
    s_win = np.take_along_axis(smp.win[a:b].numpy(), g[:, :, None], 1)
    s_val = np.take_along_axis(smp.val[a:b].numpy(), g, 1)
    s_row = np.take_along_axis(smp.row[a:b].numpy(), g, 1)
    t_ok = top.row[a:b].numpy() >= 0
    kind = np.concatenate([np.where(t_ok, KIND_TOP, KIND_NONE), np.where(ok, quant[a:b] + 1, KIND_NONE)], 1)
    used = kind[:, :, None] >= 0
    tok = np.where(used, np.concatenate([top.tok[a:b].numpy(), s_tok], 1), -1)
    win = np.where(used, np.concatenate([top.win[a:b].numpy(), s_win], 1), 0.0)
    value = np.where(kind >= 0, np.concatenate([top.val[a:b].numpy(), s_val], 1), 0.0)
    row = np.where(kind >= 0, np.concatenate([top.row[a:b].numpy(), s_row], 1), -1)
    tok = np.where(tok < 0, U16_PAD, tok).astype(np.uint16) if lay.token_dtype == "U16" else tok.astype(np.int32)
    count = stats.count[a:b].numpy()
    n = max(stats.n_rows, 1)
    mx = np.where(count > 0, top.val[a:b, 0].numpy(), 0.0)
    sums = stats.sum[a:b].numpy()
    t: dict[str, np.ndarray] = {
        "tokens": tok, "acts": np.clip(win, -65504, 65504).astype(np.float16),
        "ex_value": value.astype(np.float32), "ex_row": row.astype(np.int64), "ex_kind": kind.astype(np.int8),
        "n_quantiles": nq[a:b].astype(np.uint8), "count": count.astype(np.int64),
        "stats": np.stack([count / n, mx, sums / n, sums / np.maximum(count, 1)], 1).astype(np.float64),
        "hist": stats.hist.counts[a:b].numpy().astype(np.int64),
        "hist_upper": stats.hist.upper[a:b].numpy().astype(np.float32),
    }
    if logits is not None:
        t |= {"pos_ids": logits.pos_ids[a:b].numpy().astype(np.int32),
              "pos_values": logits.pos_vals[a:b].numpy().astype(np.float32),
              "neg_ids": logits.neg_ids[a:b].numpy().astype(np.int32),
              "neg_values": logits.neg_vals[a:b].numpy().astype(np.float32),
              "logit_hist": logits.hist_heights[a:b].numpy().astype(np.int32),
              "logit_range": np.stack([logits.hist_lo[a:b].numpy(), logits.hist_hi[a:b].numpy()], 1).astype(np.float32)}
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def encode_shard(s: int, tensors: dict[str, np.ndarray], first: int) -> str:
    blob = stn.save(tensors, metadata={"first": str(first), "n": str(len(tensors["count"]))})
    return f'saeforge.shard({s},"{base64.b64encode(zlib.compress(blob, 6)).decode()}");\n'


def write_features(out: str | os.PathLike[str], stats: FeatureStats, vocab: list[str], logits: LogitTable | None,
                   meta: dict[str, Any], n_quantiles: int = 4, per_quantile: int = 3, shard_size: int = SHARD_SIZE,
                   quiet: bool = True) -> Path:
    """Write every file of the features directory but the viewer (see `analysis.dashboard`)."""
    out = Path(out)
    d = stats.d_sae
    lay = Layout(n_latents=d, shard_size=shard_size, window=stats.window, top=stats.top.n,
                 quantile_slots=n_quantiles * per_quantile, token_dtype="U16" if len(vocab) < U16_PAD else "I32")
    slots, quant, nq = quantile_slots(stats, n_quantiles, per_quantile)
    labels, top_tokens = labels_and_top_tokens(stats, vocab, logits)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    keep = set()
    for s in progress(range(lay.n_shards), desc="shards", unit="shard", quiet=quiet):
        a, b = s * shard_size, min(d, (s + 1) * shard_size)
        p = shard_path(out, s)
        write_text_file(p, encode_shard(s, _shard_tensors(stats, lay, a, b, slots, quant, nq, logits), a))
        keep.add(p.name)
    for stale in (out / SHARDS).iterdir():  # a previous run with more latents
        if stale.name not in keep:
            stale.unlink()
    doc = {"format": FORMAT, "version": VERSION, **meta,
           "layout": {"n_latents": d, "shard_size": shard_size, "n_shards": lay.n_shards, "window": lay.window,
                      "top": lay.top, "quantile_slots": lay.quantile_slots, "n_quantiles": n_quantiles,
                      "token_dtype": lay.token_dtype, "top_tokens": TOP_TOKENS, "vocab_size": len(vocab),
                      "n_rows": stats.n_rows}}
    # What the index needs first, in the form a browser parses fastest: labels as one string (one per
    # line), three numeric columns; density is count / layout.n_rows. The top tokens (for search by
    # token) load beside the vocabulary, after the index is usable.
    cols = {"labels": "\n".join(s.replace("\n", "↵") for s in labels), "count": stats.count.tolist(),
            "max": [_sig(v) for v in stats.max_act.tolist()], "mean": [_sig(v, 3) for v in stats.mean_act.tolist()]}
    write_text_file(out / DATA / "vocab.js", js_call("vocab", vocab))
    write_text_file(out / DATA / "tokens.js", js_call("tokens", top_tokens.reshape(-1).tolist()))
    write_text_file(out / DATA / "index.js", js_call("index", {**doc, "columns": cols}))
    write_json(str(out / "features.json"), doc)
    return out


# ---- reading ----------------------------------------------------------------------------------------------

def load_features(path: str | os.PathLike[str]) -> dict[str, Any]:
    """features.json of a `saeforge features` output directory (meta and layout)."""
    p = Path(path)
    p = p / "features.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{str(path)!r} holds no features.json; run `saeforge features SAE_DIR --store STORE "
                        f"--out DIR` first")
    doc = read_json(str(p), "features file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{str(p)!r} is not a saeforge features file")
    if doc.get("version") != VERSION:
        raise UserError(f"{str(p)!r} is features format version {doc.get('version')}; this saeforge reads "
                        f"version {VERSION}: rerun `saeforge features` for that SAE")
    return doc


def fingerprint(doc: dict[str, Any]) -> str:
    """What the latent records depend on (SAE, store rows, split and example settings), hashed: an
    explanation made for one features run is reused only by a run with the same fingerprint."""
    import hashlib
    cfg = doc.get("config") or {}
    keys = {"sae": (doc.get("sae") or {}).get("path"), "d_sae": (doc.get("layout") or {}).get("n_latents"),
            "store": (doc.get("store") or {}).get("path"), "n_tokens": (doc.get("store") or {}).get("n_tokens"),
            "split": (doc.get("store") or {}).get("split"),
            **{k: cfg.get(k) for k in ("top", "window", "samples", "quantiles", "per_quantile")}}
    return hashlib.blake2b(json.dumps(keys, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def features_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent if p.name == "features.json" else p


def load_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The index: meta, layout and one list per statistic (label, count, density, max, mean, and
    top_tokens: `layout.top_tokens` ids per latent, −1 padded)."""
    load_features(path)
    f = features_dir(path) / DATA / "index.js"
    if not f.is_file():
        raise UserError(f"{str(f)!r} is missing; rerun `saeforge features`")
    doc = read_js_call(f, "index")
    cols = doc["columns"]
    n = max(int(doc["layout"].get("n_rows") or 0), 1)
    cols["label"] = cols.pop("labels").split("\n")
    cols["density"] = [c / n for c in cols["count"]]
    cols["top_tokens"] = read_js_call(features_dir(path) / DATA / "tokens.js", "tokens")
    return doc


def load_vocab(path: str | os.PathLike[str]) -> list[str]:
    return read_js_call(features_dir(path) / DATA / "vocab.js", "vocab")


def read_shard(path: str | os.PathLike[str], s: int) -> dict[str, np.ndarray]:
    f = shard_path(features_dir(path), s)
    if not f.is_file():
        raise UserError(f"shard {s} ({str(f)!r}) is missing; rerun `saeforge features`")
    m = _SHARD_RE.match(f.read_text(encoding="ascii"))
    if not m or int(m.group(1)) != s:
        raise UserError(f"{str(f)!r} is not shard {s} of a saeforge features directory; rerun `saeforge features`")
    return stn.load(zlib.decompress(base64.b64decode(m.group(2))))


class Reader:
    """Latent records of one features directory, decoding each shard once."""

    def __init__(self, path: str | os.PathLike[str]):
        self.dir = features_dir(path)
        self.doc = load_features(self.dir)
        self.layout = self.doc["layout"]
        self._vocab: list[str] | None = None
        self._shard: tuple[int, dict[str, np.ndarray]] | None = None

    @property
    def n_latents(self) -> int:
        return int(self.layout["n_latents"])

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = load_vocab(self.dir)
        return self._vocab

    def arrays(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= i < self.n_latents:
            raise UserError(f"latent {i} is out of range: this SAE has {self.n_latents} latents (0..{self.n_latents - 1})")
        s = i // int(self.layout["shard_size"])
        if self._shard is None or self._shard[0] != s:
            self._shard = (s, read_shard(self.dir, s))
        return self._shard[1], i - s * int(self.layout["shard_size"])

    def tok_str(self, t: int) -> str:
        v = self.vocab
        return v[t] if 0 <= t < len(v) else f"<{t}>"

    def latent(self, i: int) -> dict[str, Any]:
        """Latent i in Neuronpedia's field names where one fits."""
        t, j = self.arrays(i)
        pad = U16_PAD if self.layout["token_dtype"] == "U16" else -1
        density, mx, mean, mean_a = (float(v) for v in t["stats"][j])
        acts = []
        for e in range(t["ex_kind"].shape[1]):
            kind = int(t["ex_kind"][j, e])
            if kind == KIND_NONE:
                continue
            ids = t["tokens"][j, e].astype(np.int64)
            keep = np.flatnonzero(ids != pad)
            centre = int(self.layout["window"]) - int(keep[0]) if keep.size else 0
            a = {"tokens": [self.tok_str(int(ids[k])) for k in keep], "token_ids": ids[keep].tolist(),
                 "values": [float(v) for v in t["acts"][j, e][keep].astype(np.float32)],
                 "maxValue": float(t["ex_value"][j, e]), "maxValueTokenIndex": centre, "row": int(t["ex_row"][j, e]),
                 "kind": "top" if kind == KIND_TOP else "quantile"}
            if kind > KIND_TOP:
                a |= {"quantile": kind - 1, "n_quantiles": int(t["n_quantiles"][j])}
            acts.append(a)
        bins = t["hist"].shape[1]
        upper = float(t["hist_upper"][j])
        rec: dict[str, Any] = {
            "index": i, "frac_nonzero": density, "maxActApprox": mx, "mean_act": mean, "mean_act_active": mean_a,
            "count": int(t["count"][j]), "freq_hist_data_bar_heights": t["hist"][j].tolist(),
            "freq_hist_data_bar_values": [(k + 0.5) * upper / bins for k in range(bins)],
            "activations": acts}
        if "pos_ids" in t:
            lo, hi = (float(v) for v in t["logit_range"][j])
            h = t["logit_hist"][j]
            rec |= {"pos_str": [self.tok_str(int(x)) for x in t["pos_ids"][j]],
                    "pos_values": t["pos_values"][j].tolist(),
                    "neg_str": [self.tok_str(int(x)) for x in t["neg_ids"][j]],
                    "neg_values": t["neg_values"][j].tolist(),
                    "logits_hist_data_bar_heights": h.tolist(),
                    "logits_hist_data_bar_values": [lo + (k + 0.5) * (hi - lo) / len(h) for k in range(len(h))]}
        return rec


def load_latent(path: str | os.PathLike[str], i: int) -> dict[str, Any]:
    """The full record of latent i (examples, histogram, logits); use `Reader` for many latents."""
    return Reader(path).latent(i)


__all__ = ["FORMAT", "VERSION", "Reader", "load_features", "load_index", "load_latent", "load_vocab",
           "write_features", "quantile_template", "quantile_slots"]

"""Corpora: a spec string → a `datasets.Dataset` of documents → packed fixed-length token sequences.

Specs: `python-docs` (built in, offline), a .txt/.jsonl/.json/.parquet/.csv file, a folder, a glob,
or a hub dataset name (`name` or `name:config`, online only). Packing is deterministic and
resumable, so a collector can restart at any sequence index and ranks can take disjoint slices.
"""
from __future__ import annotations

import ast
import functools
import glob as globlib
import hashlib
import logging
import os
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from saeforge.errors import UserError
from saeforge.progress import progress

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

BUILTIN = "python-docs"
# file suffix → datasets packaged builder ("text" is parsed here, not by datasets)
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED = ("python-docs, a .txt/.jsonl/.json/.parquet/.csv file, a folder, a glob, "
            "or a hub dataset name (online)")
# stdlib folders whose docstrings are not prose for readers: tests, the IDE, generated codecs, vendored wheels
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
              "lib-dynload", "turtledemo", "encodings", "__phello__", "_bundled"}
_WIKI_TITLE = re.compile(r"^ = [^=].* = ?$")  # wikitext top-level heading: " = Title = "


# ---------------------------------------------------------------- loading

def load_documents(spec: str, text_field: str = "text") -> "datasets.Dataset":
    """A corpus spec → a Dataset with one column 'text', one non-empty document per row."""
    if spec == BUILTIN:
        return _python_docs()
    files = _resolve_files(spec)
    if files is None:
        ds = _load_hub(spec, text_field)
    else:
        import datasets
        parts = [_load_run(run, text_field, spec) for run in _runs(files)]
        parts = [p for p in parts if p is not None]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if ds is None or len(ds) == 0:
        raise UserError(f"corpus {spec!r} has no non-empty documents; point it at text (or fix --text-field)")
    return ds


def describe_corpus(spec: str, text_field: str = "text") -> str:
    """A short, stable description of a spec, recorded in stores so a run says what it read."""
    if spec == BUILTIN:
        return f"{BUILTIN} (builtin)"
    files = _resolve_files(spec)
    if files is None:
        return f"{spec} (hub" + (f", field {text_field!r})" if text_field != "text" else ")")
    kinds = sorted({FORMATS[f.suffix.lower()] for f in files})
    path = Path(os.path.expanduser(spec))
    where = str(path.resolve()) + ("/" if path.is_dir() else "") if path.exists() else os.path.abspath(path)
    field = f", field {text_field!r}" if text_field != "text" and kinds != ["text"] else ""
    return f"{where} ({'+'.join(kinds)}{field})"


def _resolve_files(spec: str) -> list[Path] | None:
    """The local files a spec names (sorted), None when it is not a local spec (a hub name)."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise UserError(f"corpus file {spec!r} has an unsupported type; use {', '.join(FORMATS)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"corpus folder {spec!r} holds no {'/'.join(FORMATS)} files; add some or name a file")
        return files
    if any(c in spec for c in "*?["):
        matched = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise UserError(f"corpus glob {spec!r} matches no files; check the pattern")
        bad = [p for p in matched if p.suffix.lower() not in FORMATS]
        if bad:
            raise UserError(f"corpus glob {spec!r} matches {str(bad[0])!r}, an unsupported type; "
                            f"narrow it to {'/'.join(FORMATS)} files")
        return matched
    if spec.startswith(("/", "./", "../", "~")) or path.suffix.lower() in FORMATS:
        raise UserError(f"corpus path {spec!r} does not exist; give an existing file, folder or glob")
    return None


def _runs(files: list[Path]) -> Iterator[list[Path]]:
    """Consecutive files of one format, so order is kept and each format is loaded in one call."""
    run: list[Path] = []
    for f in files:
        if run and FORMATS[f.suffix.lower()] != FORMATS[run[0].suffix.lower()]:
            yield run
            run = []
        run.append(f)
    if run:
        yield run


def _load_run(files: list[Path], text_field: str, spec: str) -> "datasets.Dataset | None":
    """Load files of one format: .txt parsed here, structured ones by datasets' packaged builders."""
    import datasets
    kind = FORMATS[files[0].suffix.lower()]
    if kind == "text":
        docs = [d for f in files for d in _split_txt(f)]
        return datasets.Dataset.from_dict({"text": docs}) if docs else None
    files = [f for f in files if f.stat().st_size > 0]  # datasets fails on empty files; they hold nothing
    if not files:
        return None
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # a malformed user file: name it instead of showing a traceback
        reason = str(e.__cause__ or e).strip().splitlines()
        what = str(files[0]) + (f" (or one of {len(files) - 1} more)" if len(files) > 1 else "")
        raise UserError(f"cannot read {what} as {kind}: {reason[0] if reason else type(e).__name__}; "
                        f"fix the file") from e
    return _text_column(ds, text_field, spec)


def _load_hub(spec: str, text_field: str) -> "datasets.Dataset":
    """A hub dataset (`name` or `name:config`); only reachable online."""
    import datasets
    if datasets.config.HF_HUB_OFFLINE:
        raise UserError(f"corpus {spec!r} is not an existing path and the hub is offline; use {ACCEPTED}")
    name, _, config = spec.partition(":")
    log.info("corpus %r is not a local path; trying it as a hub dataset", spec)
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"corpus {spec!r} is not an existing path nor a loadable hub dataset ({reason}); "
                        f"use {ACCEPTED}") from e
    return _text_column(ds, text_field, spec)


def _text_column(ds: "datasets.Dataset", text_field: str, spec: str) -> "datasets.Dataset":
    """Keep only the text column, named 'text', without empty or whitespace-only rows."""
    if text_field not in ds.column_names:
        raise UserError(f"corpus {spec!r} has no field {text_field!r} (columns: {', '.join(ds.column_names)}); "
                        f"pick one with --text-field")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(f"field {text_field!r} of corpus {spec!r} holds {dtype or ds.features[text_field]}, "
                        f"not text (columns: {', '.join(ds.column_names)}); pick one with --text-field")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.filter(lambda texts: [bool(t and not t.isspace()) for t in texts], input_columns="text",
                     batched=True, batch_size=10_000)


def _split_txt(path: Path) -> list[str]:
    """Documents of a text file: wikitext articles (` = Title = ` lines) if any, else blank-line blocks."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it with iconv") from e
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _WIKI_TITLE.match(line.rstrip("\r\n"))]
    if starts:
        bounds = [0, *starts, len(lines)] if starts[0] else [*starts, len(lines)]
        docs = ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]
    else:
        docs = re.split(r"\n[ \t\r]*\n", text)
    return [d.strip() for d in docs if d.strip()]


# ---------------------------------------------------------------- the built-in corpus

@functools.lru_cache(maxsize=1)
def _python_docs() -> "datasets.Dataset":
    """pydoc topics + stdlib docstrings, read from source (never imported: `antigravity`, `this`)."""
    import datasets
    t0 = time.perf_counter()
    docs = _python_docs_texts(quiet=False)
    ds = datasets.Dataset.from_dict({"text": docs})
    log.info("built %s: %d documents, %d chars in %.1f s", BUILTIN, len(docs), sum(map(len, docs)),
             time.perf_counter() - t0)
    return ds


def _python_docs_texts(stdlib: str | None = None, quiet: bool = True) -> list[str]:
    """The python-docs documents in a fixed order: topics by key, then docstrings by sorted path."""
    from pydoc_data.topics import topics
    docs: list[str] = []
    seen: set[str] = set()

    def add(text: str | None) -> None:
        text = (text or "").strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(text)

    for key in sorted(topics):
        add(topics[key])
    for path in progress(_stdlib_sources(Path(stdlib or sysconfig.get_paths()["stdlib"])),
                         desc=BUILTIN, unit="file", quiet=quiet):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # py2 fixtures etc.: not our text
            continue
        for doc in _docstrings(tree):
            add(doc)
    return docs


def _stdlib_sources(root: Path) -> list[Path]:
    """Standard-library .py files, sorted, without tests, the IDE and generated code."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


# ---------------------------------------------------------------- packing

@dataclass(frozen=True)
class PackedSequence:
    """One fixed-length training sequence; `index` is its place in the global, deterministic order."""
    index: int
    tokens: np.ndarray  # int32 [context]
    heldout: bool


def is_heldout(doc_index: int, fraction: float) -> bool:
    """Stable across processes and Python versions (unlike hash()), so resumes and ranks agree."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(str(doc_index).encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _text_batches(docs: Any, batch_docs: int) -> Iterator[list[str]]:
    """Batches of document texts from a Dataset (column 'text') or a plain sequence of strings."""
    if hasattr(docs, "iter") and hasattr(docs, "column_names"):
        if "text" not in docs.column_names:
            raise UserError(f"documents have no 'text' column (columns: {', '.join(docs.column_names)}); "
                            f"load them with load_documents")
        for batch in docs.select_columns(["text"]).iter(batch_size=batch_docs):
            yield batch["text"]
    else:
        for i in range(0, len(docs), batch_docs):
            yield list(docs[i:i + batch_docs])


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Plain token ids (no specials); verbose=False hides the harmless 'longer than max length' warning."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


@dataclass
class TokenShare:
    """Tokenisation split across ranks: in each round of `world_size` document batches rank r
    tokenises batch r alone, and `gather` (an all_gather of Python objects) hands every rank the
    ids of all of them. Every rank must walk the same batches (the collector drains its sequences).
    The counters say how much this rank tokenised itself."""
    rank: int
    world_size: int
    gather: Callable[[Any], list[Any]]
    docs_tokenized: int = 0
    chars_tokenized: int = 0
    docs_seen: int = 0


def _token_batches(docs: Any, tokenizer: Any, batch_docs: int, share: TokenShare | None) -> Iterator[list[list[int]]]:
    """Token ids of the documents in batches, each batch tokenised here or (with `share`) by its owner rank."""
    batches = _text_batches(docs, batch_docs)
    if share is None:
        for texts in batches:
            yield _tokenize(tokenizer, texts)
        return
    while True:
        round_ = [b for _, b in zip(range(share.world_size), batches)]
        mine = round_[share.rank] if share.rank < len(round_) else []
        share.docs_tokenized += len(mine)
        share.chars_tokenized += sum(map(len, mine))
        share.docs_seen += sum(map(len, round_))
        toks = _tokenize(tokenizer, mine) if mine else []
        flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in toks]) if toks else np.empty(0, np.int32)
        lens = np.array([len(t) for t in toks], dtype=np.int64)
        for flat_b, lens_b in share.gather((flat, lens))[:len(round_)]:
            yield [a.tolist() for a in np.split(flat_b, np.cumsum(lens_b)[:-1])] if len(lens_b) else []
        if len(round_) < share.world_size:
            return


def pack_sequences(docs: "datasets.Dataset | Sequence[str]", tokenizer: Any, context: int, *,
                   prepend_bos: bool = True, heldout_fraction: float = 0.05, batch_docs: int = 512,
                   rank: int = 0, world_size: int = 1, start: int = 0, stop: int | None = None,
                   share: TokenShare | None = None) -> Iterator[PackedSequence]:
    """Documents → fixed-length sequences, in a global order that every rank and every resume agrees on.

    Each document's tokens are followed by EOS; train and held-out documents form two streams packed
    separately (no sequence mixes them). A sequence is `[BOS] + context-1 tokens` (or `context`
    tokens without BOS). The trailing partial sequence of each stream is dropped. Only sequences with
    `start <= index < stop` and `index % world_size == rank` are yielded; no document past the one
    that completes sequence `stop - 1` is read. `share` splits the tokenisation across ranks.
    """
    if not isinstance(context, int) or context < 2:
        raise UserError(f"context {context!r} is too small; use an integer >= 2 (e.g. 128)")
    if not 0 <= heldout_fraction < 1:
        raise UserError(f"heldout_fraction {heldout_fraction!r} is out of range; use 0 <= fraction < 1 (e.g. 0.05)")
    if batch_docs < 1:
        raise UserError(f"batch_docs {batch_docs!r} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} / world_size {world_size} is invalid; need 0 <= rank < world_size")
    if start < 0:
        raise UserError(f"start {start} is negative; use the index of the first sequence to produce")
    eos = tokenizer.eos_token_id
    bos = None
    if prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        if bos is None:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a BOS nor an "
                            f"EOS token; set prepend_bos = false")
    body = context - 1 if prepend_bos else context
    streams: dict[bool, list[np.ndarray]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    index = 0
    doc_index = 0
    if stop is not None and stop <= 0:
        return
    for batch_ids in _token_batches(docs, tokenizer, batch_docs, share):
        for ids in batch_ids:
            held = is_heldout(doc_index, heldout_fraction)
            doc_index += 1
            arr = np.asarray(ids if eos is None else [*ids, eos], dtype=np.int32)
            streams[held].append(arr)
            sizes[held] += len(arr)
            if sizes[held] < body:
                continue
            buf = np.concatenate(streams[held])
            n_full = len(buf) // body
            for j in range(n_full):
                if index >= start and index % world_size == rank:
                    chunk = buf[j * body:(j + 1) * body]
                    tokens = np.concatenate([np.array([bos], dtype=np.int32), chunk]) if prepend_bos else chunk.copy()
                    yield PackedSequence(index, tokens, held)
                index += 1
                if stop is not None and index >= stop:
                    break
            rest = buf[n_full * body:].copy()
            streams[held] = [rest]
            sizes[held] = len(rest)
            if stop is not None and index >= stop:  # every rank stops in the same round: no collective left
                return


def estimate_tokens(docs: "datasets.Dataset | Sequence[str]", tokenizer: Any, sample_docs: int = 200) -> int:
    """Estimated tokens in the packed streams (content + one EOS per document), from a sample's
    tokens per character, so a collector can size its store and progress bar without tokenizing all."""
    n = len(docs)
    if n == 0:
        return 0
    idx = sorted({int(i) for i in np.linspace(0, n - 1, min(n, max(1, sample_docs)))})
    sample = docs.select(idx)["text"] if hasattr(docs, "select") else [docs[i] for i in idx]
    ratio = sum(map(len, _tokenize(tokenizer, list(sample)))) / max(1, sum(map(len, sample)))
    eos = 0 if tokenizer.eos_token_id is None else n
    return int(round(ratio * _total_chars(docs))) + eos


def _total_chars(docs: Any) -> int:
    """Characters in all documents, counted by Arrow without building Python strings."""
    if not hasattr(docs, "with_format"):
        return sum(len(t) for t in docs)
    import pyarrow.compute as pc
    total = 0
    for table in docs.select_columns(["text"]).with_format("arrow").iter(batch_size=50_000):
        total += pc.sum(pc.utf8_length(table["text"])).as_py() or 0
    return total

"""Labelled probing tasks: built in (from text that ships offline) or a user's JSONL file.

Built-in tasks are read off one pool of token windows from two corpora, python-docs (CPython's own
documentation, `collect.corpus`) and a prose corpus (wikitext-2 by default):

    corpus        sequence  which corpus a window comes from (python-docs / prose)
    code          token     a python-docs token inside a doctest statement (code) or in a prose line
    digit         token     a token made of digits / a token made of letters
    capital       token     a letters-only token starting with a capital / all lower case
    first_letter  token     the first letter of a letters-only token (one-vs-rest per letter)

A user task is a JSONL file, one `{"text": …, "label": …}` object per line: a sequence-level task
whose windows are the texts (each cut to the probing context).

Every example carries a group, the window it was read from: train/test splits and the bootstrap
resample whole windows, so tokens of one window never sit on both sides.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from saeforge.errors import UserError

BUILTIN_TASKS = ("corpus", "code", "digit", "capital", "first_letter")
TaskName = Literal["corpus", "code", "digit", "capital", "first_letter"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_CLASS_EXAMPLES = 10  # per class in a user task file


@dataclass
class ProbeTask:
    """Examples of one task: `index` into its feature rows (flat window·T + position for token tasks,
    window for sequence tasks), class labels (indices into `classes`), and groups (window ids)."""
    name: str
    level: Literal["token", "sequence"]
    classes: list[str]
    index: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    features: str = "pool"  # which feature set the rows index: the shared pool or the task's own windows


def _token_task(name: str, classes: list[str], labels: np.ndarray, valid: np.ndarray) -> ProbeTask:
    """A token task from per-token labels [W, T] (-1: not an example) restricted to `valid` tokens."""
    lab = np.where(valid, labels, -1)
    flat = np.flatnonzero(lab.reshape(-1) >= 0)
    T = labels.shape[1]
    return ProbeTask(name, "token", classes, flat, lab.reshape(-1)[flat].astype(np.int64), flat // T)


def builtin_tasks(names: list[str], pieces: list[list[str]], source: np.ndarray, code: np.ndarray,
                  valid: np.ndarray, sources: tuple[str, ...]) -> list[ProbeTask]:
    """The named built-in tasks on a pool of windows (see the module doc).

    pieces: each window's token texts; source [W]: index into `sources`; code [W, T]: 1/0/-1 code
    labels; valid [W, T]: tokens that may be examples (not BOS, not a norm outlier)."""
    W, T = valid.shape
    strip = [[p.strip() for p in row] for row in pieces]
    out: list[ProbeTask] = []
    for name in names:
        if name == "corpus":
            w = np.arange(W)
            out.append(ProbeTask("corpus", "sequence", list(sources), w, source.astype(np.int64), w))
        elif name == "code":
            out.append(_token_task("code", ["prose", "code"], code.astype(np.int64), valid))
        elif name == "digit":
            lab = np.array([[1 if p.isdigit() else 0 if p.isascii() and p.isalpha() else -1 for p in row]
                            for row in strip])
            out.append(_token_task("digit", ["letters", "digits"], lab, valid))
        elif name == "capital":
            lab = np.array([[(1 if p[0].isupper() else 0 if p.islower() else -1) if p.isascii() and p.isalpha()
                             else -1 for p in row] for row in strip])
            out.append(_token_task("capital", ["lower case", "capitalised"], lab, valid))
        elif name == "first_letter":
            lab = np.array([[LETTERS.index(p[0].lower()) if p.isascii() and p.isalpha() else -1 for p in row]
                            for row in strip])
            out.append(_token_task("first_letter", list(LETTERS), lab, valid))
        else:
            raise UserError(f"probing task {name!r} is unknown; built-in tasks: {', '.join(BUILTIN_TASKS)} "
                            f"(or pass a JSONL file of {{\"text\": ..., \"label\": ...}} lines)")
    return out


def read_task_file(path: str) -> tuple[str, list[str], list[str]]:
    """(task name, texts, labels as strings) from a JSONL file of {"text": …, "label": …} lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"probing task file {path!r} not found; pass a JSONL file with one "
                        f"{{\"text\": ..., \"label\": ...}} object per line, or a built-in task ({', '.join(BUILTIN_TASKS)})")
    texts, labels = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not JSON ({e.msg}); write one {{\"text\": ..., \"label\": ...}} "
                            f"object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise UserError(f"{path}: line {i} has no non-empty \"text\" string; write one "
                            f"{{\"text\": ..., \"label\": ...}} object per line")
        if "label" not in obj or obj["label"] is None or isinstance(obj["label"], (dict, list)):
            raise UserError(f"{path}: line {i} has no \"label\" (a string, number or bool); every line needs "
                            f"{{\"text\": ..., \"label\": ...}}")
        texts.append(obj["text"])
        labels.append(str(obj["label"]))
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"{path}: every line has label {classes[0]!r} if any; a probing task needs at least two "
                        f"classes" if classes else f"{path} holds no examples; add {{\"text\": ..., \"label\": ...}} lines")
    counts = {c: labels.count(c) for c in classes}
    few = {c: n for c, n in counts.items() if n < MIN_CLASS_EXAMPLES}
    if few:
        raise UserError(f"{path}: class(es) {few} have fewer than {MIN_CLASS_EXAMPLES} examples; add examples or "
                        f"drop those labels")
    return p.stem, texts, labels


def file_task(name: str, labels: list[str]) -> ProbeTask:
    """The sequence task of a task file whose windows are its texts in file order."""
    classes = sorted(set(labels))
    idx = np.arange(len(labels))
    return ProbeTask(name, "sequence", classes, idx, np.array([classes.index(x) for x in labels]), idx, features=name)

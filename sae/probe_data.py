"""Model activations for the probing and absorption evaluations: text windows and vocabulary words.

Probing needs activations at the SAE's hook point on labelled text, computed fresh by the model
(the store holds one corpus; probes compare two). Text is cut into windows of `context` tokens
([BOS] + context − 1 tokens of one document) and run through the model only as far as the hook.
Every token keeps the text it came from, so token-level labels (code or prose, digits, capitals,
first letter) are read off the characters it covers.

Single-token words (absorption) all share one fixed in-context prefix, so the prefix runs once and
each word costs one token of compute: the prefix's KV cache is copied for each batch of words.
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from collect.hooks import StopForward, capture, forward_to
from saeforge.progress import progress

log = logging.getLogger(__name__)

_DOCTEST = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)")
_WORDS = re.compile(r"[A-Za-z]+")


def code_prose_chars(text: str) -> np.ndarray:
    """Per character: 1 = code (the statement after a `>>> ` / `... ` doctest prompt), 0 = prose
    (a line of at least six words that is at least 80% letters), -1 = neither (output, tables, …)."""
    out = np.full(len(text), -1, dtype=np.int8)
    at = 0
    for line in text.splitlines(keepends=True):
        m = _DOCTEST.match(line)
        body = line.rstrip("\r\n")
        if m:
            out[at + m.end():at + len(body)] = 1
        else:
            chars = [c for c in body if not c.isspace()]
            letters = sum(c.isalpha() for c in chars)
            if len(_WORDS.findall(body)) >= 6 and letters >= 0.8 * max(len(chars), 1):
                out[at:at + len(body)] = 0
        at += len(line)
    return out


@dataclass
class Windows:
    """Token windows of text: ids [W, T] (BOS first), which source each came from, per-token text
    pieces, and per-token code/prose labels (-1 where not labelled)."""
    ids: np.ndarray
    source: np.ndarray
    pieces: list[list[str]]
    code: np.ndarray
    sources: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.ids)


def text_windows(texts: Sequence[str], tokenizer: Any, context: int, n_windows: int, seed: int,
                 label_code: bool = False) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """Up to `n_windows` non-overlapping windows of `context` tokens ([BOS] + context − 1 tokens of one
    document), from documents in a seeded random order; (ids [W, T], pieces, code labels [W, T])."""
    body = context - 1
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    order = np.random.default_rng(seed).permutation(len(texts))
    ids, pieces, codes = [], [], []
    for start in range(0, len(order), 64):
        batch = [texts[int(i)] for i in order[start:start + 64]]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for text, tok, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
            chars = code_prose_chars(text) if label_code else None
            for w in range(len(tok) // body):
                sl = slice(w * body, (w + 1) * body)
                ids.append([bos, *tok[sl]])
                pieces.append(["", *(text[a:b] for a, b in offs[sl])])
                lab = [-1]
                for a, b in offs[sl]:
                    s = a + (len(text[a:b]) - len(text[a:b].lstrip()))  # the token's first visible character
                    lab.append(int(chars[s]) if chars is not None and s < b else -1)
                codes.append(lab)
                if len(ids) >= n_windows:
                    return np.asarray(ids, dtype=np.int64), pieces, np.asarray(codes, dtype=np.int8)
    return (np.asarray(ids, dtype=np.int64).reshape(-1, context), pieces,
            np.asarray(codes, dtype=np.int8).reshape(-1, context))


@torch.no_grad()
def hook_activations(model: torch.nn.Module, ids: np.ndarray, hook: str, batch: int = 16,
                     attention_mask: np.ndarray | None = None, quiet: bool = True) -> np.ndarray:
    """Activations at `hook` for token ids [N, T]: float32 [N, T, d] (the forward stops at the hook)."""
    dev = next(model.parameters()).device
    out: list[np.ndarray] = []
    bar = progress(total=int(ids.size), desc="probe acts", unit="tok", quiet=quiet)
    try:
        for s in range(0, len(ids), batch):
            x = torch.from_numpy(ids[s:s + batch]).to(dev)
            am = None if attention_mask is None else torch.from_numpy(attention_mask[s:s + batch]).to(dev)
            a = forward_to(model, x, [hook], attention_mask=am)
            out.append(next(iter(a.values())).float().cpu().numpy())
            bar.update(int(x.numel()))
    finally:
        bar.close()
    return np.concatenate(out) if out else np.zeros((0, ids.shape[1], 0), dtype=np.float32)


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _run_to_hook(model: torch.nn.Module, hook: str, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with capture(model, [hook], stop=True) as acts:
        try:
            model(input_ids=ids, use_cache=True, **kw)
        except StopForward:
            pass
    return next(iter(acts.values()))


@torch.no_grad()
def word_activations(model: torch.nn.Module, prefix: Sequence[int], words: Sequence[int], hook: str,
                     batch: int = 256, quiet: bool = True) -> np.ndarray:
    """Activation at `hook` on each single-token word placed right after the fixed `prefix` ids:
    float32 [len(words), d]. The prefix runs once; each batch continues a copy of its KV cache
    (identical to running prefix + word in full, which is the fallback if a model's cache refuses)."""
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    pre = torch.tensor([list(prefix)], dtype=torch.long, device=dev)
    key = _cache_kwarg(model)
    out: list[np.ndarray] = []
    cache: Any = DynamicCache()
    try:
        _run_to_hook(model, hook, pre, **{key: cache})
        use_cache = cache.get_seq_length() == pre.shape[1]
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:
        log.warning("KV cache unavailable for this model (%s); running each word with the full prefix", e)
        use_cache = False
    bar = progress(total=len(words), desc="word acts", unit="word", quiet=quiet)
    try:
        for s in range(0, len(words), batch):
            w = torch.tensor(list(words[s:s + batch]), dtype=torch.long, device=dev)[:, None]
            if use_cache:
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(len(w))
                a = _run_to_hook(model, hook, w, **{key: c})[:, -1]
            else:
                a = _run_to_hook(model, hook, torch.cat([pre.expand(len(w), -1), w], 1))[:, -1]
            out.append(a.float().cpu().numpy())
            bar.update(len(w))
    finally:
        bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

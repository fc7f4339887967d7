"""Feature visualisation by vocabulary search (seed 004): complete and greedy.

    obj = Objective.for_latent(sae, latent=12, hook="layers.15.resid_post")   # or .for_neuron / .for_direction
    best = complete_search(model, obj, prefix=[bos])          # every token of the vocabulary, batched
    steps = greedy_search(model, obj, prefix=[bos], n_tokens=5)  # left to right, argmax per step

The objective is read at the last position of the input. For an SAE latent the activation is the
latent's value after the SAE's own rule (`encode`: TopK selection, JumpReLU threshold…); tokens
are ranked by that activation, ties (e.g. tokens the TopK rule switches off) broken by the latent's
pre-activation, so a ranking exists even where the latent is silent (objectives: analysis/objectives.py,
which also reads MLP neurons, `layers.{i}.mlp_hidden`). Forwards stop right after the read; the greedy search runs the fixed prefix once per step and reuses its KV cache for
every vocabulary batch.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from analysis.objectives import Objective, embedding_weight, reading
from saeforge.errors import UserError
from saeforge.progress import progress

__all__ = ["Objective", "Candidate", "SearchResult", "scan_vocab", "complete_search", "greedy_search",
           "activation_of",
           "activations_of", "cache_kwarg",
           "vocab_batches", "vocab_size", "decode_ids"]

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    ids: list[int]
    text: str
    activation: float
    pre: float


@dataclass
class SearchResult:
    objective: str
    prefix: list[int]
    top: list[Candidate]  # best single next tokens (complete search) or the greedy path
    steps: list[Candidate] = field(default_factory=list)
    rank: torch.Tensor | None = None  # complete search: rank of every token id (0 = best)

    @property
    def best(self) -> Candidate:
        pool = self.steps or self.top
        return max(pool, key=lambda c: (c.activation, c.pre))


def _rank(act: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Indices sorted by (activation, pre) descending."""
    order = torch.argsort(pre, descending=True, stable=True)
    return order[torch.argsort(act[order], descending=True, stable=True)]


def cache_kwarg(model: torch.nn.Module) -> str | None:
    """The name under which this model's forward takes a KV cache (`cache` in transformers ≥ 5.x,
    `past_key_values` before), or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _run_reads(model: torch.nn.Module, reads: Sequence[str], ids: torch.Tensor, cache=None) -> dict[str, torch.Tensor]:
    """{read: activations [B, T, w]} of a forward that stops once every read is taken."""
    kw: dict[str, Any] = {"input_ids": ids, "use_cache": cache is not None}
    if cache is not None:
        kw[cache_kwarg(model)] = cache  # type: ignore[index]
    with reading(model, reads) as r:
        return r.forward(model, **kw)


def _run(model: torch.nn.Module, hook: str, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """Activations at `hook` [B, T, d] of a forward that stops after the hook; returns (acts, cache)."""
    return next(iter(_run_reads(model, [hook], ids, cache).values())), cache


def _prefix_cache(model: torch.nn.Module, reads: Sequence[str], prefix: torch.Tensor):
    """KV cache of the prefix for the layers up to the deepest read, or None (with a warning saying why)
    when this model's forward takes no cache. Any other failure is an error, not a silent fallback."""
    from transformers import DynamicCache
    if cache_kwarg(model) is None:
        log.warning("%s.forward takes no KV cache; recomputing the prefix for every vocabulary batch (slower)",
                    type(model).__name__)
        return None
    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
    _run_reads(model, reads, prefix.unsqueeze(0), cache)
    if cache.get_seq_length() != prefix.numel():
        log.warning("%s filled its KV cache with %d positions for a %d-token prefix; recomputing the prefix "
                    "for every vocabulary batch (slower)", type(model).__name__, cache.get_seq_length(), prefix.numel())
        return None
    return cache


def vocab_size(model: torch.nn.Module, vocab: int | None = None) -> int:
    """The number of token ids searched: all of the embedding matrix, or the first `vocab`."""
    n = int(embedding_weight(model).shape[0])
    if vocab is not None and not 1 <= vocab <= n:
        raise UserError(f"--vocab {vocab} is out of range: this model has {n} token ids (use 1..{n})")
    return vocab or n


@torch.no_grad()
def vocab_batches(model: torch.nn.Module, reads: Sequence[str], prefix: list[int], vocab: int | None = None,
                  batch: int = 512, use_cache: bool = True, quiet: bool = True, desc: str = "vocab"
                  ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """For token ids t = 0..vocab−1 in batches: (first id of the batch, {read: activation of
    `prefix + [t]` at its last position [b, w]}). The prefix runs once; its KV cache serves every batch."""
    dev = next(model.parameters()).device
    n = vocab_size(model, vocab)
    pre_ids = torch.tensor(prefix, dtype=torch.long, device=dev)
    cache = _prefix_cache(model, reads, pre_ids) if (use_cache and prefix) else None
    for a in progress(range(0, n, batch), total=(n + batch - 1) // batch, desc=desc, unit="batch", quiet=quiet):
        tok = torch.arange(a, min(a + batch, n), device=dev)
        b = tok.numel()
        if cache is not None:
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(b)
            out = _run_reads(model, reads, tok.unsqueeze(1), c)
        else:
            out = _run_reads(model, reads, torch.cat([pre_ids.expand(b, -1), tok.unsqueeze(1)], 1))
        yield a, {k: v[:, -1] for k, v in out.items()}


@torch.no_grad()
def scan_vocab(model: torch.nn.Module, obj: Objective, prefix: list[int], vocab: int | None = None,
               batch: int = 512, use_cache: bool = True, quiet: bool = True, desc: str = "vocab"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and tie-break key of `prefix + [t]` at its last position for every token t."""
    n = vocab_size(model, vocab)
    acts, keys = torch.empty(n), torch.empty(n)
    for a, out in vocab_batches(model, [obj.hook], prefix, n, batch, use_cache, quiet, desc):
        v, k = obj.evaluate(next(iter(out.values())))
        acts[a:a + v.numel()], keys[a:a + v.numel()] = v.cpu(), k.cpu()
    return acts, keys


def decode_ids(tokenizer, ids: list[int]) -> str:
    """Token ids as text (ids joined by spaces without a tokenizer, e.g. for tiny test models)."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if tokenizer is not None else " ".join(map(str, ids))


def complete_search(model: torch.nn.Module, obj: Objective, prefix: list[int] | None = None, tokenizer=None,
                    top: int = 10, vocab: int | None = None, batch: int = 512, use_cache: bool = True,
                    quiet: bool = True) -> SearchResult:
    """Every single token after `prefix`, batched; the `top` tokens by activation."""
    prefix = list(prefix or [])
    act, key = scan_vocab(model, obj, prefix, vocab, batch, use_cache, quiet, desc="complete search")
    full = _rank(act, key)
    rank = torch.empty_like(full)
    rank[full] = torch.arange(full.numel())
    cands = [Candidate([int(t)], decode_ids(tokenizer, [int(t)]), float(act[t]), float(key[t])) for t in full[:top]]
    return SearchResult(obj.name, prefix, cands, rank=rank)


def greedy_search(model: torch.nn.Module, obj: Objective, n_tokens: int, prefix: list[int] | None = None,
                  tokenizer=None, top: int = 5, vocab: int | None = None, batch: int = 512, use_cache: bool = True,
                  quiet: bool = True) -> SearchResult:
    """Build an input left to right: at each step append the token that maximises the activation at
    the last position (beam width 1). `steps[j]` is the string after j+1 tokens; `top` holds the
    runner-up tokens of the first step; `best` is the best string over all steps."""
    if n_tokens < 1:
        raise UserError(f"--greedy-tokens {n_tokens} must be at least 1")
    prefix = list(prefix or [])
    path: list[int] = []
    steps: list[Candidate] = []
    first: list[Candidate] = []
    for s in range(n_tokens):
        act, key = scan_vocab(model, obj, prefix + path, vocab, batch, use_cache, quiet, desc=f"greedy {s + 1}/{n_tokens}")
        order = _rank(act, key)
        t = int(order[0])
        if s == 0:
            first = [Candidate([int(u)], decode_ids(tokenizer, [int(u)]), float(act[u]), float(key[u])) for u in order[:top]]
        path.append(t)
        steps.append(Candidate(list(path), decode_ids(tokenizer, path), float(act[t]), float(key[t])))
    return SearchResult(obj.name, prefix, first, steps)


@torch.no_grad()
def activation_of(model: torch.nn.Module, obj: Objective, ids: list[int] | torch.Tensor,
                  from_pos: int | None = None) -> tuple[float, float]:
    """Re-run one input from scratch (no cache) and read the objective at its last position, or, with
    `from_pos`, its mean over positions from_pos.. (the `--positions all` readout)."""
    acts, keys = activations_of(model, obj, torch.as_tensor(ids).reshape(1, -1), from_pos)
    return float(acts[0]), float(keys[0])


@torch.no_grad()
def activations_of(model: torch.nn.Module, obj: Objective, ids: torch.Tensor,
                   from_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`activation_of` for a batch of equal-length inputs [B, T]: (activations [B], keys [B])."""
    dev = next(model.parameters()).device
    h, _ = _run(model, obj.hook, ids.to(dev))
    if from_pos is None:
        return obj.evaluate(h[:, -1])
    b, t, w = h[:, from_pos:].shape
    v, k = obj.evaluate(h[:, from_pos:].reshape(b * t, w))
    return v.reshape(b, t).mean(1), k.reshape(b, t).mean(1)

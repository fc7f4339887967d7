"""Feature visualisation by vocabulary search (seed 004): complete and greedy.

    obj = Objective.for_latent(sae, latent=12, hook="layers.15.resid_post")   # or Objective.for_neuron(hook, j)
    best = complete_search(model, obj, prefix=[bos])          # every token of the vocabulary, batched
    steps = greedy_search(model, obj, prefix=[bos], n_tokens=5)  # left to right, argmax per step

The objective is read at the last position of the input. For an SAE latent the activation is the
latent's value after the SAE's own rule (`encode`: TopK selection, JumpReLU threshold…); tokens
are ranked by that activation, ties (e.g. tokens the TopK rule switches off) broken by the latent's
pre-activation, so a ranking exists even where the latent is silent. Forwards stop right after
the hook point; the greedy search runs the fixed prefix once per step and reuses its KV cache for
every vocabulary batch.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch

from saeforge.errors import UserError
from collect.hooks import StopForward, capture
from saeforge.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Objective:
    """What is maximised: a neuron of a hook point, or an SAE latent read at the SAE's hook point."""
    hook: str
    neuron: int | None = None
    sae: torch.nn.Module | None = None
    latent: int | None = None

    @classmethod
    def for_neuron(cls, hook: str, neuron: int, d_model: int) -> "Objective":
        if not 0 <= neuron < d_model:
            raise UserError(f"--neuron {neuron} is out of range: hook {hook!r} has {d_model} dimensions (0..{d_model - 1})")
        return cls(hook=hook, neuron=neuron)

    @classmethod
    def for_latent(cls, sae: torch.nn.Module, latent: int, hook: str) -> "Objective":
        d_sae = int(sae.W_dec.shape[0])
        if not 0 <= latent < d_sae:
            raise UserError(f"--latent {latent} is out of range: this SAE has {d_sae} latents (0..{d_sae - 1})")
        return cls(hook=hook, sae=sae, latent=latent)

    @property
    def name(self) -> str:
        return f"latent {self.latent} at {self.hook}" if self.sae is not None else f"neuron {self.neuron} of {self.hook}"

    @torch.no_grad()
    def evaluate(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activation, tie-break key) for activations [B, d] at the last position."""
        acts = acts.float()
        if self.sae is None:
            v = acts[:, self.neuron]
            return v, v
        pre = self.sae.pre_acts(acts)[:, self.latent]
        act = self.sae.encode(acts)[:, self.latent]
        return act, pre


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

    @property
    def best(self) -> Candidate:
        pool = self.steps or self.top
        return max(pool, key=lambda c: (c.activation, c.pre))


def _rank(act: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Indices sorted by (activation, pre) descending."""
    order = torch.argsort(pre, descending=True, stable=True)
    return order[torch.argsort(act[order], descending=True, stable=True)]


def _run(model: torch.nn.Module, hook: str, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """Activations at `hook` [B, T, d] of a forward that stops after the hook; returns (acts, cache)."""
    with capture(model, [hook], stop=True) as acts:
        try:
            model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        except StopForward:
            pass
    return next(iter(acts.values())), cache


def _prefix_cache(model: torch.nn.Module, hook: str, prefix: torch.Tensor):
    """KV cache of the prefix for the layers up to the hook (None when caching is not possible)."""
    try:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config) if "config" in DynamicCache.__init__.__code__.co_varnames else DynamicCache()
        _run(model, hook, prefix.unsqueeze(0), cache)
        return cache if cache.get_seq_length() == prefix.numel() else None
    except Exception as e:  # noqa: BLE001 - an architecture without a standard cache falls back to recomputing
        log.info("no KV cache for the prefix (%s); recomputing it per batch", e)
        return None


@torch.no_grad()
def scan_vocab(model: torch.nn.Module, obj: Objective, prefix: list[int], vocab: int | None = None,
               batch: int = 512, use_cache: bool = True, quiet: bool = True, desc: str = "vocab"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and tie-break key of `prefix + [t]` at its last position for every token t."""
    dev = next(model.parameters()).device
    n = vocab or int(model.get_input_embeddings().weight.shape[0])
    pre_ids = torch.tensor(prefix, dtype=torch.long, device=dev)
    cache = _prefix_cache(model, obj.hook, pre_ids) if (use_cache and prefix) else None
    acts, keys = torch.empty(n), torch.empty(n)
    for a in progress(range(0, n, batch), total=(n + batch - 1) // batch, desc=desc, unit="batch", quiet=quiet):
        tok = torch.arange(a, min(a + batch, n), device=dev)
        b = tok.numel()
        if cache is not None:
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(b)
            h, _ = _run(model, obj.hook, tok.unsqueeze(1), c)
        else:
            ids = torch.cat([pre_ids.expand(b, -1), tok.unsqueeze(1)], 1)
            h, _ = _run(model, obj.hook, ids)
        v, k = obj.evaluate(h[:, -1])
        acts[a:a + b], keys[a:a + b] = v.cpu(), k.cpu()
    return acts, keys


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if tokenizer is not None else " ".join(map(str, ids))


def complete_search(model: torch.nn.Module, obj: Objective, prefix: list[int] | None = None, tokenizer=None,
                    top: int = 10, vocab: int | None = None, batch: int = 512, use_cache: bool = True,
                    quiet: bool = True) -> SearchResult:
    """Every single token after `prefix`, batched; the `top` tokens by activation."""
    prefix = list(prefix or [])
    act, key = scan_vocab(model, obj, prefix, vocab, batch, use_cache, quiet, desc="complete search")
    order = _rank(act, key)[:top]
    cands = [Candidate([int(t)], _decode(tokenizer, [int(t)]), float(act[t]), float(key[t])) for t in order]
    return SearchResult(obj.name, prefix, cands)


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
            first = [Candidate([int(u)], _decode(tokenizer, [int(u)]), float(act[u]), float(key[u])) for u in order[:top]]
        path.append(t)
        steps.append(Candidate(list(path), _decode(tokenizer, path), float(act[t]), float(key[t])))
    return SearchResult(obj.name, prefix, first, steps)


@torch.no_grad()
def activation_of(model: torch.nn.Module, obj: Objective, ids: list[int]) -> tuple[float, float]:
    """Re-run one input from scratch (no cache) and read the objective at its last position."""
    dev = next(model.parameters()).device
    h, _ = _run(model, obj.hook, torch.tensor([ids], device=dev))
    v, k = obj.evaluate(h[:, -1])
    return float(v[0]), float(k[0])

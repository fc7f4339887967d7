"""Are features at the same index aligned across layers (and across models)? Seed 004's study.

    units = neuron_units(model, "resid_post", features=64)            # or sae_units(model, [sae dirs], 64)
    tops = top_inputs_complete(model, units, prefix=[bos], top=10)     # [layers, F, 10] token ids
    m = overlap(tops, tops)                                            # [layers, layers], 1 on the diagonal
    ctrl = random_init_copy(model, seed=0)                             # same config, fresh weights, no download

For every unit (a layer's read: a hook point or `layers.{i}.mlp_hidden`, or a per-layer SAE) and
every feature f < F, the *top inputs* are either the `top` single tokens that maximise the feature
after the prefix (complete search: one forward of the vocabulary through the model, stopping at the
deepest unit, serves every layer and every feature at once) or the tokens of the greedy string of
`greedy_tokens` tokens (greedy search, one per unit and feature). The overlap of layers i and j is the
mean over features of |T_i(f) ∩ T_j(f)| / min(|T_i(f)|, |T_j(f)|) (distinct tokens). Two random
sets of K tokens out of V overlap by K/V on average: `chance`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from analysis.objectives import Objective, canonical_read, read_width
from analysis.vocab_search import greedy_search, vocab_batches, vocab_size
from collect.layers import discover_layout
from saeforge.errors import UserError
from saeforge.progress import progress

if TYPE_CHECKING:
    from sae.architectures import SAE

log = logging.getLogger(__name__)

SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out", "mlp_hidden")


@dataclass
class Unit:
    """One row of the study: a read, the features 0..F−1 valued there, and a label."""
    label: str
    read: str
    features: torch.Tensor                  # [F] indices: neurons of the read, or SAE latents
    sae: "SAE | None" = None

    def values(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activation, tie-break key) [B, F] of last-position activations [B, w]."""
        acts = acts.float()
        idx = self.features.to(acts.device)
        if self.sae is None:
            v = acts[:, idx]
            return v, v
        return self.sae.encode(acts)[:, idx], self.sae.pre_acts(acts)[:, idx]

    def objective(self, f: int) -> Objective:
        i = int(self.features[f])
        if self.sae is None:
            return Objective(hook=self.read, neuron=i)
        return Objective(hook=self.read, sae=self.sae, latent=i)


def neuron_units(model: torch.nn.Module, site: str, features: int, layers: Sequence[int] | None = None) -> list[Unit]:
    """Neurons 0..F−1 of `layers.{i}.{site}` at every layer (or the given ones), as the seed does."""
    if site not in SITES:
        raise UserError(f"--site {site!r}: use one of {', '.join(SITES)}")
    n = discover_layout(model).n_layers
    chosen = list(range(n)) if not layers else list(layers)
    units = []
    for i in chosen:
        read = canonical_read(model, f"layers.{i}.{site}")
        w = read_width(model, read)
        if not 1 <= features <= w:
            raise UserError(f"--features {features} is out of range: {read!r} has {w} dimensions (use 1..{w})")
        units.append(Unit(read, read, torch.arange(features)))
    return units


def sae_units(model: torch.nn.Module, saes: Sequence[tuple[str, "SAE", str]], features: int,
              match: str = "index") -> list[Unit]:
    """Latents 0..F−1 of per-layer SAEs given as (label, SAE, hook point).

    `match="index"` compares latent f of every SAE (meaningful only if the SAEs share an index order);
    `match="decoder"` compares latent f of the first SAE with its one-to-one decoder-cosine partner in
    each other SAE (analysis/align.py), so independently trained SAEs can be compared."""
    from analysis.align import align
    if not saes:
        raise UserError("no SAEs given; pass --saes DIR,DIR,… (one per layer)")
    if match not in ("index", "decoder"):
        raise UserError(f"--sae-match {match!r}: use index or decoder")
    ref = saes[0][1]
    units = []
    for label, sae, hook in saes:
        d_sae = int(sae.W_dec.shape[0])
        if not 1 <= features <= d_sae:
            raise UserError(f"--features {features} is out of range: SAE {label!r} has {d_sae} latents (use 1..{d_sae})")
        idx = torch.arange(features)
        if match == "decoder" and sae is not ref:
            idx = align(ref.W_dec[:features], sae.W_dec, one_to_one="greedy").match_b
        units.append(Unit(label, canonical_read(model, hook), idx, sae))
    return units


def _merge_top(vals: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best entries along the last dim by (value, key), descending."""
    order = torch.argsort(keys, dim=-1, descending=True, stable=True)
    order = order.gather(-1, torch.argsort(vals.gather(-1, order), dim=-1, descending=True, stable=True))[..., :k]
    return vals.gather(-1, order), keys.gather(-1, order), ids.gather(-1, order)


@torch.no_grad()
def top_inputs_complete(model: torch.nn.Module, units: Sequence[Unit], prefix: list[int], top: int = 10,
                        vocab: int | None = None, batch: int = 512, quiet: bool = True, desc: str = "complete search"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [U, F, top], activations [U, F, top]): the best single tokens after `prefix` for every
    unit and feature, from one batched pass over the vocabulary that reads every unit at once."""
    n = vocab_size(model, vocab)
    if not 1 <= top <= n:
        raise UserError(f"--top {top} is out of range: the search covers {n} tokens")
    reads = list(dict.fromkeys(u.read for u in units))
    U, F = len(units), max(int(u.features.numel()) for u in units)
    if any(int(u.features.numel()) != F for u in units):
        raise UserError("every unit must have the same number of features")
    best_v = torch.full((U, F, 0), 0.0)
    best_k, best_i = best_v.clone(), torch.zeros(U, F, 0, dtype=torch.long)
    for a, out in vocab_batches(model, reads, prefix, n, batch, quiet=quiet, desc=desc):
        vs, ks = zip(*(u.values(out[u.read]) for u in units))
        v = torch.stack(vs).transpose(1, 2).cpu()             # [U, F, b]
        k = torch.stack(ks).transpose(1, 2).cpu()
        ids = torch.arange(a, a + v.shape[-1]).expand(U, F, -1)
        best_v, best_k, best_i = _merge_top(torch.cat([best_v, v], -1), torch.cat([best_k, k], -1),
                                            torch.cat([best_i, ids], -1), top)
    return best_i, best_v


def top_inputs_greedy(model: torch.nn.Module, units: Sequence[Unit], prefix: list[int], n_tokens: int = 3,
                      vocab: int | None = None, batch: int = 512, quiet: bool = True, desc: str = "greedy search"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [U, F, n_tokens], activation after each step [U, F, n_tokens]): the greedy string
    of every unit and feature."""
    U, F = len(units), int(units[0].features.numel())
    ids = torch.zeros(U, F, n_tokens, dtype=torch.long)
    acts = torch.zeros(U, F, n_tokens)
    bar = progress(total=U * F, desc=desc, unit="feature", quiet=quiet)
    for u, unit in enumerate(units):
        for f in range(F):
            res = greedy_search(model, unit.objective(f), n_tokens, prefix, vocab=vocab, batch=batch)
            ids[u, f] = torch.tensor(res.steps[-1].ids)
            acts[u, f] = torch.tensor([s.activation for s in res.steps])
            bar.update(1)
    bar.close()
    return ids, acts


def _distinct(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace repeated ids along the last dim by unique negative sentinels; (ids, set sizes)."""
    K = t.shape[-1]
    dup = torch.zeros_like(t, dtype=torch.bool)
    for j in range(1, K):
        dup[..., j] = (t[..., :j] == t[..., j:j + 1]).any(-1)
    sentinel = -1 - torch.arange(K).expand_as(t)
    return torch.where(dup, sentinel, t), (~dup).sum(-1)


def overlap(tops_a: torch.Tensor, tops_b: torch.Tensor) -> torch.Tensor:
    """[Ua, Ub]: mean over features f of |A ∩ B| / min(|A|, |B|) for A = tops_a[i, f], B = tops_b[j, f]."""
    if tops_a.shape[1:] != tops_b.shape[1:]:
        raise UserError(f"the two studies differ in features × top inputs: {tuple(tops_a.shape[1:])} vs "
                        f"{tuple(tops_b.shape[1:])}")
    a, na = _distinct(tops_a)
    b, nb = _distinct(tops_b)
    b_sent = torch.where(b < 0, b - tops_a.shape[-1], b)       # b's sentinels never meet a's
    out = torch.empty(a.shape[0], b.shape[0])
    for i in range(a.shape[0]):
        hit = (a[i][None, :, :, None] == b_sent[:, :, None, :]).any(-1).sum(-1)  # [Ub, F]
        out[i] = (hit.float() / torch.minimum(na[i][None], nb).clamp_min(1).float()).mean(1)
    return out


def chance_overlap(top: int, vocab: int) -> float:
    """Expected overlap of two independent random `top`-subsets of `vocab` tokens."""
    return top / vocab


def adjacent_mean(m: torch.Tensor) -> float:
    """Mean overlap of layer i with layer i+1 (a square, same-model matrix)."""
    return float(torch.diagonal(m, 1).mean()) if m.shape[0] > 1 else float("nan")


def matched_depth_mean(m: torch.Tensor) -> float:
    """Mean overlap of A's layer i with B's layer at the same relative depth (the diagonal when square)."""
    ua, ub = m.shape
    j = [round(i * (ub - 1) / max(ua - 1, 1)) for i in range(ua)]
    return float(m[torch.arange(ua), torch.tensor(j)].mean())


def random_init_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model of the same config with freshly initialised weights (`from_config`, seeded; nothing is
    read from disk or the network), in eval mode on the same device, float32."""
    from transformers import AutoModelForCausalLM
    cfg = copy.deepcopy(model.config)
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ctrl = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ctrl.to(dev).eval()
    ctrl.requires_grad_(False)
    return ctrl


@dataclass
class Study:
    """Top inputs of two sets of units (A and B; the same model and units for a within-model study)
    and their layers × layers overlap."""
    labels_a: list[str]
    labels_b: list[str]
    tops_a: torch.Tensor          # [Ua, F, K] token ids
    tops_b: torch.Tensor
    overlap: torch.Tensor         # [Ua, Ub]
    chance: float
    seconds: float

    @property
    def summary(self) -> float:
        """Mean adjacent-layer overlap (within a model) or matched-depth overlap (across models)."""
        return adjacent_mean(self.overlap) if self.tops_a is self.tops_b else matched_depth_mean(self.overlap)


def top_inputs(model: torch.nn.Module, units: Sequence[Unit], prefix: list[int], method: str = "complete",
               top: int = 10, greedy_tokens: int = 3, vocab: int | None = None, batch: int = 512,
               quiet: bool = True, desc: str = "") -> torch.Tensor:
    """[U, F, K] top-input token ids by `method` ("complete": K = top, "greedy": K = greedy_tokens)."""
    if method == "complete":
        return top_inputs_complete(model, units, prefix, top, vocab, batch, quiet, desc or "complete search")[0]
    if method == "greedy":
        if greedy_tokens < 1:
            raise UserError(f"--greedy-tokens {greedy_tokens} must be at least 1")
        return top_inputs_greedy(model, units, prefix, greedy_tokens, vocab, batch, quiet, desc or "greedy search")[0]
    raise UserError(f"--method {method!r}: use complete or greedy")


def study(model_a: torch.nn.Module, units_a: Sequence[Unit], prefix: list[int], *,
          model_b: torch.nn.Module | None = None, units_b: Sequence[Unit] | None = None, method: str = "complete",
          top: int = 10, greedy_tokens: int = 3, vocab: int | None = None, batch: int = 512, quiet: bool = True,
          desc: str = "") -> Study:
    """Top inputs of every unit of A (and of B, when given: another model of the same vocabulary) and
    the overlap matrix A × B (A × A without B)."""
    import time
    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(method=method, top=top, greedy_tokens=greedy_tokens, vocab=vocab, batch=batch, quiet=quiet)
    tops_a = top_inputs(model_a, units_a, prefix, desc=f"{desc} A".strip() if model_b is not None else desc, **kw)
    tops_b = tops_a
    if model_b is not None:
        n_a, n_b = vocab_size(model_a, vocab), vocab_size(model_b, vocab)
        if n_a != n_b:
            raise UserError(f"the models search different vocabularies ({n_a} vs {n_b} token ids); pass models of "
                            f"the same tokenizer or a common --vocab")
        tops_b = top_inputs(model_b, units_b or units_a, prefix, desc=f"{desc} B".strip(), **kw)
    n = vocab_size(model_a, vocab)
    chance = chance_overlap(tops_a.shape[-1], n)
    labels_b = [u.label for u in (units_b or units_a)]
    return Study([u.label for u in units_a], labels_b, tops_a, tops_b, overlap(tops_a, tops_b), chance,
                 time.perf_counter() - t0)

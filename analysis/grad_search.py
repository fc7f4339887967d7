"""Feature visualisation by gradient ascent on a soft input (seed 004), batched over restarts.

    res = gradient_search(model, obj, n_tokens=5, prefix=[bos], prior="softmax", restarts=8, seed=0)
    res.best.ids, res.best.activation      # the discretised tokens and what they really produce as tokens

Two parametrisations of the N searched positions (after a fixed token prefix, BOS by default):

- `softmax` (the seed's prior): logits Z [N, V] → softmax(Z / τ) → rows mixing the embedding matrix.
  τ falls geometrically from `temp_start` to `temp_end`, so the input starts as a blend and ends
  close to one token per position; discretised by argmax over Z.
- `embed` (the plain variant): the input embeddings themselves, started at random tokens' embeddings,
  kept within the largest token-embedding norm; discretised to the nearest token (L2).

Either way the objective's differentiable score (`Objective.soft`: the neuron, the projection on a
direction, or an SAE latent's pre-activation) is maximised at the last position (`positions="last"`)
or on average over the searched positions (`"all"`). Every `eval_every` steps each restart's
discretisation is run *as tokens* and the best one seen is kept: a soft optimum is worth only what
its tokens produce. The forward stops right after the read, and only the soft input gets gradients.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from analysis.objectives import Objective, embedding_weight, input_embedding, reading
from analysis.vocab_search import activations_of, decode_ids, vocab_size
from saeforge.errors import UserError
from saeforge.progress import progress

log = logging.getLogger(__name__)

Prior = Literal["softmax", "embed"]
Positions = Literal["last", "all"]
PRIORS: tuple[str, ...] = ("softmax", "embed")


@dataclass
class GradRun:
    """One restart: its best discretisation (run as tokens) and the soft objective it reached."""
    ids: list[int]          # searched tokens (prefix excluded)
    text: str
    activation: float       # the objective when `prefix + ids` is run as tokens
    pre: float              # tie-break key (an SAE latent's pre-activation; else = activation)
    soft: float             # soft score at the last step (the continuous input's objective)
    soft_max: float         # best soft score over the run
    step: int               # step at which this discretisation was found


@dataclass
class GradResult:
    objective: str
    prior: str
    positions: str
    prefix: list[int]
    runs: list[GradRun]
    steps: int
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # mean soft score per step, over restarts

    @property
    def best(self) -> GradRun:
        return max(self.runs, key=lambda r: (r.activation, r.pre))


def effective_embeddings(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    """[vocab, d] what the input-embedding module gives for each token id (Gemma-style scaled embeddings
    included), so a soft one-hot p gives the embedding p @ E exactly like a token would."""
    emb = input_embedding(model)
    dev = embedding_weight(model).device
    with torch.no_grad():
        return emb(torch.arange(vocab, device=dev)).float()


def _temperature(step: int, steps: int, t0: float, t1: float) -> float:
    return t0 if steps <= 1 else t0 * (t1 / t0) ** (step / (steps - 1))


def gradient_search(model: torch.nn.Module, obj: Objective, n_tokens: int, prefix: list[int] | None = None, *,
                    prior: Prior = "softmax", steps: int = 100, restarts: int = 8, lr: float = 0.3,
                    temp_start: float = 1.0, temp_end: float = 0.05, init_scale: float = 1.0,
                    positions: Positions = "last", vocab: int | None = None, seed: int = 0, eval_every: int = 10,
                    tokenizer=None, quiet: bool = True) -> GradResult:
    """Optimise `restarts` soft inputs of `n_tokens` positions in one batch; see the module docstring.

    `lr` is in logit units for `softmax` and in units of the embedding matrix's RMS entry for `embed`.
    `init_scale` is the std of the initial logits (softmax) or of the noise added to the starting
    tokens' embeddings, relative to their RMS entry (embed)."""
    import time
    if prior not in PRIORS:
        raise UserError(f"--prior {prior!r}: use one of {', '.join(PRIORS)}")
    if n_tokens < 1 or steps < 1 or restarts < 1:
        raise UserError(f"--grad-tokens ({n_tokens}), --steps ({steps}) and --restarts ({restarts}) must be ≥ 1")
    if not (temp_start > 0 and temp_end > 0) or not lr > 0:
        raise UserError(f"--temp-start {temp_start}, --temp-end {temp_end} and --lr {lr} must be > 0")
    t_start = time.perf_counter()
    prefix = list(prefix or [])
    emb = input_embedding(model)
    dev = embedding_weight(model).device
    dtype = embedding_weight(model).dtype
    v = vocab_size(model, vocab)
    E = effective_embeddings(model, v)                       # [V, d]
    rms = float(E.pow(2).mean().sqrt())
    P, R, N = len(prefix), restarts, n_tokens
    with torch.no_grad():
        pre_e = emb(torch.tensor(prefix, dtype=torch.long, device=dev)).float()  # [P, d]
    gen = torch.Generator().manual_seed(seed)
    if prior == "softmax":
        param = (torch.randn(R, N, v, generator=gen) * init_scale).to(dev).requires_grad_(True)
        step_lr = lr
    else:
        start = torch.randint(v, (R, N), generator=gen)
        noise = torch.randn(R, N, E.shape[1], generator=gen) * init_scale * rms
        param = (E[start.to(dev)] + noise.to(dev)).requires_grad_(True)
        step_lr = lr * rms
        max_norm = float(E.norm(dim=1).max())
        e_sq = E.pow(2).sum(1)
    opt = torch.optim.Adam([param], lr=step_lr)

    def soft_embeds(step: int) -> torch.Tensor:
        if prior == "softmax":
            tau = _temperature(step, steps, temp_start, temp_end)
            return torch.softmax(param / tau, dim=-1) @ E
        return param

    @torch.no_grad()
    def discretise() -> torch.Tensor:
        if prior == "softmax":
            return param.argmax(-1)
        return (2 * param @ E.t() - e_sq).argmax(-1)        # nearest token by L2

    def score(h: torch.Tensor) -> torch.Tensor:
        return obj.soft(h[:, -1]) if positions == "last" else obj.soft(h[:, P:]).mean(1)

    pre_ids = torch.tensor(prefix, dtype=torch.long, device=dev).expand(R, P)
    best: list[tuple[float, float, list[int], int]] = [(-math.inf, -math.inf, [], -1)] * R
    soft_last = [-math.inf] * R
    soft_max = [-math.inf] * R
    history: list[float] = []
    from_pos = None if positions == "last" else P
    bar = progress(range(steps), desc=f"gradient ({prior})", unit="step", quiet=quiet)
    for step in bar:
        x = torch.cat([pre_e.expand(R, P, -1), soft_embeds(step)], 1).to(dtype)  # the model's compute dtype
        with reading(model, [obj.hook], detach=False) as reader:
            h = next(iter(reader.forward(model, inputs_embeds=x, use_cache=False).values()))
        s = score(h)
        opt.zero_grad(set_to_none=True)
        (-s.sum()).backward(inputs=[param])
        opt.step()
        if prior == "embed":
            with torch.no_grad():
                n = param.norm(dim=-1, keepdim=True)
                param.mul_(torch.where(n > max_norm, max_norm / n, torch.ones_like(n)))
        vals = s.detach().float().cpu().tolist()
        soft_last = vals
        soft_max = [max(a, b) for a, b in zip(soft_max, vals)]
        history.append(sum(vals) / R)
        if (eval_every and step % eval_every == 0) or step == steps - 1:
            ids = discretise()
            act, key = activations_of(model, obj, torch.cat([pre_ids, ids], 1), from_pos)
            for r in range(R):
                cand = (float(act[r]), float(key[r]), ids[r].tolist(), step)
                if cand[:2] > best[r][:2]:
                    best[r] = cand
            bar.set_postfix(soft=f"{max(vals):.3g}", tokens=f"{max(b[0] for b in best):.3g}")
    runs = [GradRun(ids=b[2], text=decode_ids(tokenizer, b[2]), activation=b[0], pre=b[1], soft=sl, soft_max=sm,
                    step=b[3]) for b, sl, sm in zip(best, soft_last, soft_max)]
    return GradResult(obj.name, prior, positions, prefix, runs, steps, time.perf_counter() - t_start, history)


@dataclass
class Agreement:
    """How a gradient-search string compares with complete and greedy search on the same feature."""
    activation: float              # the gradient string's activation, run as tokens
    greedy_activation: float       # the greedy string of the same length, same readout
    complete_max: float            # the best single token (complete search)
    same_as_greedy: bool
    shared_with_greedy: int        # distinct tokens the two strings share
    complete_ranks: list[int]      # rank of each gradient token as a single token after the prefix (0 = best)


def agreement(grad: GradRun, greedy_ids: list[int], greedy_activation: float, complete_rank: torch.Tensor,
              complete_max: float) -> Agreement:
    """Compare one gradient run with the greedy string (same length and readout) and the complete search
    (`complete_rank[t]`: rank of token t; from `complete_search(...).rank`)."""
    return Agreement(grad.activation, greedy_activation, complete_max, grad.ids == greedy_ids,
                     len(set(grad.ids) & set(greedy_ids)),
                     [int(complete_rank[t]) if t < complete_rank.numel() else -1 for t in grad.ids])

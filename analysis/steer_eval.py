"""Measure a steering vector: side-by-side generations, change in log-probability of target tokens,
KL from the base model on neutral text, a random direction of equal norm as the control, and sweeps
over coefficients. Also the typical residual norm at a hook point (for relative coefficients)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from analysis.directions import SteeringVector
from analysis.steer_apply import random_like, steer
from analysis.steer_sampling import Sampling, logits_processors
from collect.hooks import forward_to
from saeforge.errors import UserError

log = logging.getLogger(__name__)

NEUTRAL = [
    "The train leaves the station at seven in the morning and arrives shortly after noon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library is on the second floor, next to the reading room.",
    "To install the package, run the command shown below in a terminal.",
    "The committee will meet on Thursday to review the budget for next year.",
    "Most maps of the city show the river running from north to south.",
    "A triangle has three sides, and the sum of its angles is one hundred and eighty degrees.",
    "The museum opens at nine and closes at five on weekdays.",
]


def read_neutral(path: str | Path | None) -> list[str]:
    """Neutral held-out sentences: one per non-empty line of `path`, or the built-in few."""
    if path is None:
        return list(NEUTRAL)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--neutral-file {str(path)!r} not found; pass a text file with one sentence per line")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"--neutral-file {str(path)!r} is empty; put one neutral sentence per line")
    return lines


def chat_text(tokenizer, text: str, chat: bool) -> str:
    """The prompt as the model should see it: wrapped in the chat template for instruct models."""
    if not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this tokenizer has no chat template; drop --chat for a base model")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def encode(tokenizer, text: str, chat: bool = False) -> torch.Tensor:
    """`[1, n]` token ids; the chat template already holds its special tokens."""
    return tokenizer(chat_text(tokenizer, text, chat), return_tensors="pt", add_special_tokens=not chat).input_ids


def target_ids(tokenizer, targets: str | Sequence[str]) -> list[int]:
    """`" love, happy, great"` → the first token of " love", " happy", " great" (leading spaces kept)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [(t if i == 0 else " " + t.lstrip()).rstrip() for i, t in enumerate(items)]
    items = [t for t in items if t.strip()]
    if not items:
        raise UserError(f"--targets {targets!r} holds no words; pass e.g. --targets \" love, happy, great\"")
    ids = []
    for t in items:
        toks = tokenizer(t, add_special_tokens=False).input_ids
        if len(toks) > 1:
            log.info("target %r is %d tokens; scoring its first token %r", t, len(toks), tokenizer.decode(toks[:1]))
        ids.append(toks[0])
    return sorted(set(ids))


@torch.no_grad()
def generate(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 40, sampling: Sampling | None = None,
             ctx: ContextManager | None = None) -> torch.Tensor:
    """Continuation ids `[n_new]` with `ctx` (a steering block) active, sampled with llama.cpp's chain
    and defaults (analysis/steer_sampling.py): greedy when the temperature is ≤ 0."""
    s = sampling or Sampling()
    torch.manual_seed(s.seed)
    sample = s.temperature > 0
    # transformers' own warpers are switched off: the chain comes in llama.cpp's order from logits_processors
    kw = dict(do_sample=sample, max_new_tokens=max_new_tokens, logits_processor=logits_processors(s),
              pad_token_id=tokenizer.pad_token_id, repetition_penalty=None, min_p=None,
              temperature=1.0 if sample else None, top_k=0 if sample else None, top_p=1.0 if sample else None)
    dev = next(model.parameters()).device
    with ctx or contextlib.nullcontext():
        out = model.generate(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), **kw)
    return out[0, ids.shape[1]:].cpu()


@torch.no_grad()
def target_logprob(model, ids: torch.Tensor, cont: torch.Tensor, targets: list[int],
                   ctx: ContextManager | None = None) -> float:
    """Mean over the last prompt position and every continuation position of log Σ p(target).

    One teacher-forced forward over prompt + continuation; the steering block should be opened with
    `prompt_lengths=[len(prompt)]` so that positions="prompt"/"generated" split at the right place."""
    dev = next(model.parameters()).device
    full = torch.cat([ids[0], cont]).unsqueeze(0).to(dev)
    with ctx or contextlib.nullcontext():
        logits = model(input_ids=full, use_cache=False).logits[0].float()
    lp = logits[ids.shape[1] - 1:-1].log_softmax(-1) if cont.numel() else logits[-1:].log_softmax(-1)
    return float(lp[:, targets].logsumexp(-1).mean())


@torch.no_grad()
def neutral_logprobs(model, tokenizer, texts: list[str], ctx: ContextManager | None = None) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    out = []
    with ctx or contextlib.nullcontext():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt").input_ids.to(dev)
            out.append(model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1))
    return out


def kl_from_base(base: list[torch.Tensor], steered: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(base ‖ steered) in nats."""
    kls = [(b.exp() * (b - s)).sum(-1) for b, s in zip(base, steered)]
    return float(torch.cat(kls).mean())


@dataclass
class SweepRow:
    coeff: float
    dlogp: float          # change of mean log Σ p(targets) vs base
    kl: float             # KL(base ‖ steered) on neutral text, nats/token
    dlogp_random: float
    kl_random: float


def sweep(model, tokenizer, vector: SteeringVector, coeffs: Sequence[float], prompt_ids: torch.Tensor,
          targets: list[int], neutral: list[str], *, op: str = "add", positions: str = "all",
          norm_scale: float | dict | None = None, latent=None, cont: torch.Tensor | None = None,
          seed: int = 0, skip_first: int = 0, progress: Callable | None = None) -> list[SweepRow]:
    """One row per coefficient for the vector and for a random direction of equal norm (seed fixed).

    Δlog-prob is measured on `cont` (the base model's continuation, teacher-forced), so every row
    scores the same tokens; KL uses the neutral texts with the vector at every position."""
    cont = cont if cont is not None else torch.zeros(0, dtype=torch.long)
    rand = random_like(vector, seed)
    n_prompt = prompt_ids.shape[1]
    base_lp = target_logprob(model, prompt_ids, cont, targets)
    base_neutral = neutral_logprobs(model, tokenizer, neutral)
    rows = []
    it = progress(coeffs) if progress else coeffs
    for c in it:
        figs = []
        for v in (vector, rand):
            kw = dict(coeff=c, op=op, norm_scale=norm_scale, latent=latent, skip_first=skip_first)
            lp = target_logprob(model, prompt_ids, cont, targets,
                                steer(model, v, positions=positions, prompt_lengths=[n_prompt], **kw))
            kl = kl_from_base(base_neutral, neutral_logprobs(model, tokenizer, neutral, steer(model, v, **kw)))
            figs += [lp - base_lp, kl]
        rows.append(SweepRow(float(c), *figs))
    return rows


def format_sweep(rows: list[SweepRow], unit: str = "") -> str:
    head = f"| coeff{unit} | Δ log p(targets) | KL(base‖steered) neutral | random: Δ log p | random: KL |"
    lines = [head, "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.coeff:g} | {r.dlogp:+.3f} | {r.kl:.4f} | {r.dlogp_random:+.3f} | {r.kl_random:.4f} |")
    return "\n".join(lines)


@torch.no_grad()
def typical_norm(model, tokenizer, point: str, texts: Sequence[str] | None = None) -> float:
    """Median L2 norm of the activation at `point` over neutral texts, skipping each text's first token
    (the attention sink, whose norm can be 100× the rest)."""
    norms = []
    dev = next(model.parameters()).device
    for t in texts or NEUTRAL:
        ids = tokenizer(t, return_tensors="pt").input_ids.to(dev)
        a = forward_to(model, ids, point)[point][0].float()
        norms.append(a[1:].norm(dim=-1) if a.shape[0] > 1 else a.norm(dim=-1))
    return float(torch.cat(norms).median())


def store_norm(store_path: str | Path, point: str) -> float:
    """`norm_median` recorded by the activation store for `point`."""
    try:
        from collect.store import Store
    except ImportError:
        raise UserError("--store needs collect.store, which this install lacks; pass --norm-scale FLOAT instead")
    st = Store.open(store_path)
    norms = st.attrs.get("norm_median") or {}
    if point not in norms:
        raise UserError(f"--store {str(store_path)!r} records no norm for {point!r} (it has {sorted(norms)}); "
                        f"pass --norm-scale FLOAT or collect that hook point")
    return float(norms[point])

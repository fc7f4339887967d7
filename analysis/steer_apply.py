"""Apply a steering vector inside a `with` block, for `generate` and plain forwards alike.

Operators: add (x + coeff·v), ablate (project the direction out), clamp (set an SAE latent to a value:
x + (value − a(x))·d_dec). Positions: "all", "prompt" or "generated", chosen by absolute position so
the choice stays right under a KV cache and with left padding:

- a token's position is `position_ids` from the block's call when present (HF `generate` builds them from
  the attention mask, so with left padding the first real token of every row is 0), else
  `cache_position`, else a counter of tokens seen at that hook (reset by every multi-token forward);
- a row's prompt length is `prompt_lengths[row]` when given, else it is inferred at every multi-token
  forward as max(position)+1 of that row (the prefill), and single-token forwards are generated tokens.

Note: with positions="generated" the first new token is predicted from the unsteered prompt, so
steering shows from the second generated token on (the same holds for llama.cpp with a prompt cache).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from analysis.directions import SaeLatent, SteeringVector
from collect.hooks import HookCall, hooks
from saeforge.errors import UserError

OPS = ("add", "ablate", "clamp")
POSITIONS = ("all", "prompt", "generated")


@dataclass
class PositionTracker:
    """Absolute positions `[batch, seq]` of the tokens in a block call, and each row's prompt length."""
    prompt_lengths: torch.Tensor | None = None     # given by the caller: fixed
    inferred: torch.Tensor | None = None           # from the last multi-token forward
    seen: dict[str, int] = field(default_factory=dict)

    def positions(self, x: torch.Tensor, call: HookCall) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        pid = call.kwargs.get("position_ids")
        if pid is None:
            cp = call.kwargs.get("cache_position")
            pid = cp.unsqueeze(0) if cp is not None else None
        if pid is None:
            start = 0 if t > 1 else self.seen.get(call.point.name, 0)
            pid = torch.arange(start, start + t, device=x.device).unsqueeze(0)
            self.seen[call.point.name] = start + t
        if pid.ndim == 3:   # mrope-style [3, batch, seq]: the text position is the first
            pid = pid[0]
        pid = pid.to(x.device)
        if pid.shape[-1] != t:
            pid = pid[..., -t:]
        pid = pid.expand(b, t)
        if t > 1 and self.prompt_lengths is None:
            self.inferred = pid.max(dim=1).values + 1
        return pid

    def prompt_len(self, b: int, device: torch.device) -> torch.Tensor:
        pl = self.prompt_lengths if self.prompt_lengths is not None else self.inferred
        if pl is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        pl = pl.to(device)
        return pl.expand(b) if pl.numel() == 1 else pl

    def mask(self, which: str, pos: torch.Tensor) -> torch.Tensor | None:
        """Which tokens of a call to edit, given their positions from `positions`."""
        if which == "all":
            return None
        pl = self.prompt_len(pos.shape[0], pos.device).unsqueeze(1)
        return pos < pl if which == "prompt" else pos >= pl


def _vector_at(vec: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`[d]` → broadcastable `[d]`; per-position `[P, d]` → `[b, t, d]` with row p at position p, zero beyond."""
    if vec.ndim == 1:
        return vec
    p = vec.shape[0]
    rows = vec[pos.clamp(0, p - 1)]
    return rows * (pos < p).unsqueeze(-1).to(rows.dtype)


def steer_fn(vector: torch.Tensor, tracker: PositionTracker, coeff: float = 1.0, op: str = "add",
             positions: str = "all", latent: SaeLatent | None = None, skip_first: int = 0):
    """The edit function for one hook point (see `steer`)."""
    if op not in OPS:
        raise UserError(f"--op {op!r} is not known; use one of {list(OPS)}")
    if positions not in POSITIONS:
        raise UserError(f"--positions {positions!r} is not known; use one of {list(POSITIONS)}")
    if op == "clamp" and latent is None:
        raise UserError("--op clamp needs an SAE latent: pass --sae DIR --latent I")
    if op == "ablate" and vector.ndim != 1:
        raise UserError("--op ablate needs one direction, not a per-position one; use --read last or mean")

    def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        pos = tracker.positions(x, call)
        m = tracker.mask(positions, pos)
        if skip_first:
            keep = pos >= skip_first
            m = keep if m is None else m & keep
        v = _vector_at(vector.to(device=x.device, dtype=x.dtype), pos)
        if op == "add":
            delta = coeff * v
        elif op == "ablate":
            d = v / v.norm()
            delta = -(x @ d).unsqueeze(-1) * d
        else:
            assert latent is not None   # checked above
            a = latent.encode(x.float()).to(x.dtype)
            delta = (coeff - a).unsqueeze(-1) * v     # v is the latent's decoder row (or a control of equal norm)
        if m is not None:
            delta = delta * m.unsqueeze(-1).to(x.dtype)
        return x + delta
    return fn


@contextlib.contextmanager
def steer(model: torch.nn.Module, vector: SteeringVector | dict[str, torch.Tensor], coeff: float = 1.0,
          op: str = "add", positions: str = "all", prompt_lengths: Sequence[int] | torch.Tensor | int | None = None,
          norm_scale: float | dict[str, float] | None = None, latent: SaeLatent | None = None,
          skip_first: int = 0) -> Iterator[PositionTracker]:
    """Steer `model` inside the block; hooks are always removed on exit.

    add: x + coeff·v at the selected positions. With `norm_scale` the coefficient is relative:
    x + coeff·norm_scale·v/|v| (norm_scale = typical residual norm at that point, from the store).
    ablate: x − (x·v̂)v̂. clamp: x + (coeff − a(x))·v, a(x) the SAE latent's activation and v its decoder
    row (the vector from `from_sae`; a random vector there gives the control).
    `skip_first` leaves absolute positions below it alone (1 = spare the attention-sink first token).
    `prompt_lengths` (per row, in position_ids units) is only needed for teacher-forced forwards that
    hold prompt and continuation in one call; `generate` is handled without it."""
    dirs = vector.directions if isinstance(vector, SteeringVector) else vector
    tracker = PositionTracker()
    if prompt_lengths is not None:
        tracker.prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).reshape(-1)
    if op == "add":   # exactly the vectors the file exports write (added_vectors)
        fns = {p: steer_fn(v, tracker, 1.0, op, positions, latent, skip_first)
               for p, v in added_vectors(dirs, coeff, norm_scale).items()}
    else:
        fns = {p: steer_fn(v.detach().float(), tracker, coeff, op, positions, latent, skip_first)
               for p, v in dirs.items()}
    with hooks(model, fns):
        yield tracker


def added_vectors(vector: SteeringVector | dict[str, torch.Tensor], coeff: float = 1.0,
                  norm_scale: float | dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """What `op="add"` adds at each hook point, float32: coeff·v, or with `norm_scale` (relative
    coefficients) coeff·norm_scale[point]·v/|v|, where |v| is the largest row norm of a per-position
    direction. The steering hook and every export (.npy, .bin, llama.cpp GGUF) use this one function,
    so the files hold exactly what was added."""
    dirs = vector.directions if isinstance(vector, SteeringVector) else vector
    out = {}
    for point, vec in dirs.items():
        vec = vec.detach().float()
        c = coeff
        if norm_scale is not None:
            ns = norm_scale[point] if isinstance(norm_scale, dict) else norm_scale
            n = vec.norm(dim=-1).max() if vec.ndim == 2 else vec.norm()
            if float(n) == 0:
                raise UserError(f"the direction at {point} is zero, so a relative coefficient is undefined; "
                                f"use a plain --coeff or another direction")
            c = coeff * float(ns) / float(n)
        out[point] = c * vec
    return out


def random_like(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A Gaussian random direction with the same shape and per-row norms (fixed seed): the control."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, v in vector.directions.items():
        r = torch.randn(v.shape, generator=g)
        out[p] = r * (v.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return SteeringVector(out, {**vector.meta, "source": f"random(seed={seed}) like {vector.meta.get('source')}"})

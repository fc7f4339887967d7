"""The SAE optimizers behind one interface, chosen by name (`--optimizer`).

  adam                 torch Adam (fused), with the trainer's warm-up/constant/decay schedule
  adam-schedulefree    schedulefree.AdamWScheduleFree (no decay needed; averaged weights)
  signum-schedulefree  schedulefree.ScheduleFreeWrapper over sign-SGD, momentum 0.95 (sparsify's default)

Schedule-free optimizers keep two weight sequences: the parameters hold the point y where
gradients are taken, the state holds z (the SGD sequence), and the weights meant for inference are
the running average x = y + (1 − 1/β)(z − y). `inference_weights()` swaps x in for evaluation and
saving and restores y bit-exactly afterwards, so evaluating never changes the training run.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal, get_args

import torch

log = logging.getLogger(__name__)

OptimizerName = Literal["adam", "adam-schedulefree", "signum-schedulefree"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULE_FREE = frozenset({"adam-schedulefree", "signum-schedulefree"})

# base lr at d_sae = 2^14, batch 4096; scaled by 1/√(d_sae/2^14) (see default_lr)
BASE_LR: dict[str, float] = {"adam": 6e-4, "adam-schedulefree": 2e-3, "signum-schedulefree": 4e-3}


def default_lr(optimizer: str, d_sae: int) -> float:
    """lr = BASE_LR[optimizer] / √(d_sae / 2^14), the d_sae rule sparsify and OpenAI's TopK paper use.

    adam: 3× sparsify's Adam rule, because our encoder starts at W_decᵀ (norm 1) rather than at
    nn.Linear scale (norm ≈ 0.58), so the same step moves it relatively less; signum-schedulefree:
    0.8× sparsify's signum rule (5e-3), measured in bench/quality.py: at 1.2M tokens it reaches held-out
    FVU 0.166 where sparsify's lr gives 0.170, and ties at 200k (README); adam-schedulefree: measured
    there too."""
    return BASE_LR[optimizer] / math.sqrt(d_sae / 16384)


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr·sign(g): steepest descent in the L∞ norm (Bernstein et al. 2018), as in sparsify."""

    def __init__(self, params: Any, lr: float = 1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                torch._foreach_add_(ps, torch._foreach_sign([p.grad for p in ps]), alpha=-group["lr"])


BIASES = ("b_enc", "b_dec")


class SignumScheduleFree(torch.optim.Optimizer):
    """Schedule-free sign-SGD: the same iterates as schedulefree.ScheduleFreeWrapper(SignSGD) in 4 passes.

    The wrapper swaps x in and out of the z buffer around the base step (11 passes over each
    parameter); like schedulefree's AdamWScheduleFree this updates y without forming x:
    y ← lerp(y, z, c) + lr·(β(1−c) − 1)·sign(g), z ← z − lr·sign(g), with c = w_t/Σw and
    w_t = lr_max² (the wrapper's weight_lr_power 2, r 0). Parameters hold y; state holds z.
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum, "k": 0, "lr_max": 0.0, "weight_sum": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** 2
            group["weight_sum"] = weight_sum = group["weight_sum"] + weight
            c = weight / weight_sum if weight_sum else 0.0
            for p in ps:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
            zs = [self.state[p]["z"] for p in ps]
            signs = [p.grad for p in ps]
            torch._foreach_sign_(signs)  # in place: the gradient is consumed by this step
            torch._foreach_lerp_(ps, zs, c)
            torch._foreach_add_(ps, signs, alpha=lr * (beta * (1 - c) - 1))
            torch._foreach_add_(zs, signs, alpha=-lr)
            group["k"] += 1


class TrainOptimizer:
    """One optimizer over one SAE's parameters: step, lr, state (for exact resume), inference weights.

    Two parameter groups: weights at lr, biases (b_enc, b_dec) at lr × bias_lr_scale. Sign-like
    updates (signum, and Adam's normalised step) move every coordinate by about lr whatever its
    gradient, and the biases live in input units, where one coordinate of a unit-mean-square input
    is ~1/√d_in: the same lr that suits unit-norm weight rows would throw the biases around."""

    def __init__(self, name: str, named_params: list[tuple[str, torch.nn.Parameter]], lr: float,
                 momentum: float = 0.95, bias_lr_scale: float = 1.0):
        if name not in OPTIMIZERS:
            from saeforge.errors import UserError
            raise UserError(f"--optimizer {name!r} is unknown; choose from {', '.join(OPTIMIZERS)}")
        self.name = name
        self.params = [p for _, p in named_params]
        self.schedule_free = name in SCHEDULE_FREE
        self.beta = 0.0
        weights = [p for n, p in named_params if n not in BIASES]
        biases = [p for n, p in named_params if n in BIASES]
        groups: list[dict[str, Any]] = [{"params": weights, "lr_scale": 1.0}, {"params": biases, "lr_scale": bias_lr_scale}]
        groups = [dict(g, lr=lr * g["lr_scale"]) for g in groups if g["params"]]
        self.opt: Any
        if name == "adam":
            try:  # the fused kernel is ~10× faster than the per-tensor loop on CPU
                self.opt = torch.optim.Adam(groups, lr=lr, fused=True)
            except (RuntimeError, TypeError) as e:
                log.warning("fused Adam is unavailable here (%s); using the per-tensor loop, about 10x slower on CPU", e)
                self.opt = torch.optim.Adam(groups, lr=lr)
        elif name == "adam-schedulefree":
            from schedulefree import AdamWScheduleFree
            self.beta = 0.9
            self.opt = AdamWScheduleFree(groups, lr=lr, betas=(self.beta, 0.999), warmup_steps=0)
            self.opt.train()
        else:
            self.beta = momentum
            self.opt = SignumScheduleFree(groups, lr=lr, momentum=momentum)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()  # schedule-free: z and the averaging weights live here too

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    @torch.no_grad()
    def averaged(self) -> list[torch.Tensor]:
        """The inference weights x, one per parameter (the parameters themselves for Adam)."""
        if not self.schedule_free:
            return [p.detach() for p in self.params]
        out = []
        for p in self.params:
            z = self.opt.state[p].get("z")
            out.append(p.detach().clone() if z is None else torch.lerp(p.detach(), z, 1 - 1 / self.beta))
        return out

    @contextmanager
    def inference_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged weights; y comes back bit-exactly."""
        if not self.schedule_free:
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, x in zip(self.params, self.averaged()):
                p.copy_(x)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in zip(self.params, saved):
                    p.copy_(y)

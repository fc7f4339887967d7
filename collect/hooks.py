"""Read and edit hook points with PyTorch hooks that are always removed, even on error.

`capture` records activations; `edit` rewrites them (add a vector, replace, project out);
`forward_to` runs a forward that stops right after the deepest hook point it needs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from collect.layers import SITES, HookPoint, Layout, discover_layout, parse_hook_points, resolve_hook_point
from saeforge.errors import UserError


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once every needed activation is read."""


def _untuple(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _retuple(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


@dataclass
class HookCall:
    """What an edit function may look at besides the activation: the hook point and the call's kwargs
    (for decoder blocks these carry `position_ids`, which stay absolute under a KV cache)."""
    point: HookPoint
    args: tuple
    kwargs: dict = field(default_factory=dict)


EditFn = Callable[[torch.Tensor, HookCall], torch.Tensor | None]


def _layout(model: torch.nn.Module, layout: Layout | None) -> Layout:
    if layout is not None:
        return layout
    cached = getattr(model, "_saeforge_layout", None)
    if cached is None:
        cached = discover_layout(model)
        setattr(model, "_saeforge_layout", cached)
    return cached


def _register(model: torch.nn.Module, hp: HookPoint, fn: EditFn) -> torch.utils.hooks.RemovableHandle:
    """Register `fn(activation, call) -> new activation or None` at a hook point."""
    module = model.get_submodule(hp.module)
    if hp.inplace:  # resid_mid: the norm's input is also the residual the block adds the MLP output to
        def inplace_hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x, HookCall(hp, args, kwargs))
            if new is not None and new is not x:
                x.copy_(new)
        return module.register_forward_pre_hook(inplace_hook, with_kwargs=True)
    if hp.reads_input:
        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0], HookCall(hp, args, kwargs))
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"], HookCall(hp, args, kwargs))
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod, args, kwargs, output):
        new = fn(_untuple(output), HookCall(hp, args, kwargs))
        return None if new is None else _retuple(output, new)
    return module.register_forward_hook(post_hook, with_kwargs=True)


@contextlib.contextmanager
def hooks(model: torch.nn.Module, fns: dict[str, EditFn], layout: Layout | None = None) -> Iterator[list[HookPoint]]:
    """Install `{hook point: fn}` for the duration of the block; yields the resolved points."""
    lay = _layout(model, layout)
    pairs = [(resolve_hook_point(lay, name), fn) for name, fn in fns.items()]
    seen: dict[str, str] = {}
    for (hp, _), given in zip(pairs, fns):
        if hp.name in seen:  # e.g. layers.-1.resid_post and layers.29.resid_post: never shift or drop one
            raise UserError(f"hook points {seen[hp.name]!r} and {given!r} are the same point {hp.name!r}; "
                            f"give each point once (combine the two functions into one)")
        seen[hp.name] = given
    handles = []
    try:
        for hp, fn in pairs:
            handles.append(_register(model, hp, fn))
        yield [hp for hp, _ in pairs]
    finally:
        for h in handles:
            h.remove()


_SITE_ORDER = {site: i for i, site in enumerate(SITES)}


def forward_order_key(hp: HookPoint) -> tuple[int, int]:
    """Forward order of hook points: by block, then resid_pre < attn_out < resid_mid < mlp_in < mlp_out <
    resid_post (in parallel blocks mlp_in still comes after attn_out: attention runs first)."""
    return (hp.layer, _SITE_ORDER.get(hp.site, 0))


@contextlib.contextmanager
def capture(model: torch.nn.Module, points: Sequence[str] | str, *, stop: bool = False, detach: bool = True,
            layout: Layout | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activations at `points` into the yielded dict (keyed by canonical name).

    With stop=True the forward raises StopForward right after the deepest point is read; use
    `forward_to`, which catches it. Each forward overwrites the previous entries."""
    lay = _layout(model, layout)
    resolved = parse_hook_points(lay, points if isinstance(points, str) else list(points))
    deepest = max(resolved, key=forward_order_key)
    acts: dict[str, torch.Tensor] = {}

    def make(hp: HookPoint) -> EditFn:
        def fn(x: torch.Tensor, call: HookCall) -> None:
            # a copy: some blocks change tensors in place after the hook (Falcon adds attention into its MLP output)
            acts[hp.name] = x.detach().clone() if detach else x
            if stop and hp is deepest:
                raise StopForward
        return fn

    with hooks(model, {hp.name: make(hp) for hp in resolved}, lay):
        yield acts


@torch.no_grad()
def forward_to(model: torch.nn.Module, input_ids: torch.Tensor, points: Sequence[str] | str,
               attention_mask: torch.Tensor | None = None, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Run the model just far enough to read `points`; returns {canonical name: activation}."""
    with capture(model, points, stop=True, layout=layout) as acts:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return dict(acts)


# ---- edit operators: each returns an EditFn for `hooks(...)` --------------------------------

def add_vector(vector: torch.Tensor, coeff: float = 1.0,
               mask: Callable[[torch.Tensor, HookCall], torch.Tensor] | None = None) -> EditFn:
    """x + coeff·vector, optionally only where `mask(x, call)` ([batch, seq] bool) is true."""
    def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        v = (coeff * vector).to(device=x.device, dtype=x.dtype)
        if mask is None:
            return x + v
        return x + mask(x, call).unsqueeze(-1).to(x.dtype) * v
    return fn


def replace_with(values: torch.Tensor | Callable[[torch.Tensor, HookCall], torch.Tensor]) -> EditFn:
    """Replace the activation with a tensor of the same shape (or the result of a function of it)."""
    def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        new = values(x, call) if callable(values) else values
        if new.shape != x.shape:
            raise ValueError(f"replacement at {call.point.name} has shape {tuple(new.shape)}, activation has {tuple(x.shape)}")
        return new.to(device=x.device, dtype=x.dtype)
    return fn


def project_out(direction: torch.Tensor) -> EditFn:
    """Remove the component along `direction` (directional ablation)."""
    def fn(x: torch.Tensor, call: HookCall) -> torch.Tensor:
        d = direction.to(device=x.device, dtype=x.dtype)
        d = d / d.norm()
        return x - (x @ d).unsqueeze(-1) * d
    return fn

"""What a feature search maximises, and how it is read out of a forward that stops right after it.

A *read* is a hook point (`layers.6.resid_post`, `embed`, … as in collect/layers.py) or
`layers.{i}.mlp_hidden`: the hidden activations of block i's MLP, i.e. the input of its output
projection (`down_proj`, `c_proj`, `dense_4h_to_h`, `fc_out` …, found by watching which child of the
MLP is called last with a non-residual width), so "MLP neuron j" means the same on every model.

An `Objective` is one scalar per input read at one point:
- a neuron: coordinate j of the read (a residual-stream basis direction, or an MLP neuron);
- an SAE latent: the latent after the SAE's own rule (`encode`), ties broken by its pre-activation;
- a direction (e.g. a steering vector from `saeforge steer --save`): the projection on its unit vector.
`evaluate` gives (activation, tie-break key) as reported; `soft` is the differentiable score that
gradient search ascends (for an SAE latent its pre-activation, since TopK/JumpReLU have no gradient
where the latent is off).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence, cast

import torch

from collect.hooks import HookCall, StopForward, hooks
from collect.layers import Layout, discover_layout, resolve_hook_point
from saeforge.errors import UserError

if TYPE_CHECKING:
    from sae.architectures import SAE

MLP_HIDDEN_RE = re.compile(r"^layers\.(-?\d+)\.mlp_hidden$")


def _layout(model: torch.nn.Module) -> Layout:
    lay = getattr(model, "_saeforge_layout", None)
    if lay is None:
        lay = discover_layout(model)
        model.__dict__["_saeforge_layout"] = lay
    return lay


def input_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's token-embedding module (typed: `nn.Module.__getattr__` hides it from mypy)."""
    return cast(torch.nn.Module, model.get_input_embeddings())  # type: ignore[operator]


def embedding_weight(model: torch.nn.Module) -> torch.Tensor:
    """The token-embedding matrix [vocab, d_model]."""
    return cast(torch.Tensor, input_embedding(model).weight)


def d_model_of(model: torch.nn.Module) -> int:
    return int(embedding_weight(model).shape[1])


def _weighted_children(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_children() if isinstance(getattr(m, "weight", None), torch.Tensor)]


@torch.no_grad()
def mlp_output_projection(model: torch.nn.Module, layer: int) -> str:
    """Module name of block `layer`'s MLP output projection: the last weighted child of the MLP called
    in a forward whose input is not d_model wide (its input is the MLP's hidden activation)."""
    lay = _layout(model)
    if not lay.mlp:
        raise UserError(f"{type(model).__name__}: no MLP submodule was found in its blocks; "
                        f"layers.N.mlp_hidden cannot be read on this model")
    cache = model.__dict__.setdefault("_saeforge_mlp_proj", {})
    if layer in cache:
        return cache[layer]
    mlp_name = lay.mlp[layer]
    mlp = model.get_submodule(mlp_name)
    d = d_model_of(model)
    calls: list[tuple[str, int]] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []
    for name, child in _weighted_children(mlp):
        def pre(mod, args, name=name):
            calls.append((name, int(args[0].shape[-1])))
            if len(calls) == len(handles):
                raise StopForward
        handles.append(child.register_forward_pre_hook(pre))
    try:
        dev = embedding_weight(model).device
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    hidden = [n for n, width in calls if width != d]
    if not hidden:
        raise UserError(f"{type(model).__name__}: could not find the output projection of MLP {mlp_name!r} "
                        f"(no child takes a non-{d} input); layers.N.mlp_hidden cannot be read on this model")
    cache[layer] = f"{mlp_name}.{hidden[-1]}"
    return cache[layer]


def canonical_read(model: torch.nn.Module, name: str) -> str:
    """`layers.-1.mlp_hidden` → `layers.29.mlp_hidden`; hook points resolve as in collect/layers.py."""
    m = MLP_HIDDEN_RE.match(name.strip())
    if m is None:
        return resolve_hook_point(_layout(model), name).name
    n = _layout(model).n_layers
    i = int(m.group(1))
    if not -n <= i < n:
        raise UserError(f"layer {i} in {name!r} is out of range: this model has {n} layers (0..{n - 1})")
    return f"layers.{i % n}.mlp_hidden"


def read_width(model: torch.nn.Module, name: str) -> int:
    """Width of a read: d_model for hook points, the MLP's hidden size for mlp_hidden."""
    m = MLP_HIDDEN_RE.match(canonical_read(model, name))
    if m is None:
        return d_model_of(model)
    mod = model.get_submodule(mlp_output_projection(model, int(m.group(1))))
    w = cast(torch.Tensor, mod.weight)
    # nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out]
    return int(w.shape[1] if isinstance(mod, torch.nn.Linear) else w.shape[0])


class Reader:
    """Records the reads of one forward (keyed by canonical name) and ends it once all are read."""

    def __init__(self, names: Sequence[str]):
        self.names = list(dict.fromkeys(names))
        self.acts: dict[str, torch.Tensor] = {}

    def record(self, name: str, x: torch.Tensor, detach: bool) -> None:
        self.acts[name] = x.detach() if detach else x
        if len(self.acts) == len(self.names):
            raise StopForward

    def forward(self, model: torch.nn.Module, **kw: Any) -> dict[str, torch.Tensor]:
        """Run `model(**kw)` until every read is recorded; returns {name: activation [B, T, width]}."""
        self.acts = {}
        try:
            model(**kw)
        except StopForward:
            pass
        missing = [n for n in self.names if n not in self.acts]
        if missing:
            raise RuntimeError(f"the forward never reached {missing}")
        return dict(self.acts)


@contextlib.contextmanager
def reading(model: torch.nn.Module, names: Sequence[str], detach: bool = True) -> Iterator[Reader]:
    """Install readers for hook points and `layers.{i}.mlp_hidden` for the duration of the block."""
    if getattr(model, "_saeforge_reading", False):
        raise RuntimeError("reading() blocks do not nest: the outer one would end the forward before the inner "
                           "one reads")
    canon = [canonical_read(model, n) for n in names]
    reader = Reader(canon)
    points = [n for n in reader.names if not MLP_HIDDEN_RE.match(n)]
    mlp = [n for n in reader.names if MLP_HIDDEN_RE.match(n)]
    handles = []

    def make(name: str):
        def fn(x: torch.Tensor, call: HookCall) -> None:
            reader.record(name, x, detach)
        return fn

    model.__dict__["_saeforge_reading"] = True
    try:
        for n in mlp:
            mod = model.get_submodule(mlp_output_projection(model, int(MLP_HIDDEN_RE.match(n).group(1))))  # type: ignore[union-attr]
            handles.append(mod.register_forward_pre_hook(lambda mod, args, n=n: reader.record(n, args[0], detach)))
        with contextlib.ExitStack() as stack:
            if points:
                stack.enter_context(hooks(model, {p: make(p) for p in points}, _layout(model)))
            yield reader
    finally:
        model.__dict__["_saeforge_reading"] = False
        for h in handles:
            h.remove()


@dataclass
class Objective:
    """One scalar per input, read at `hook` (a hook point or `layers.{i}.mlp_hidden`)."""
    hook: str
    neuron: int | None = None
    sae: "SAE | None" = None
    latent: int | None = None
    direction: torch.Tensor | None = None  # unit vector [width]
    label: str | None = None  # how a direction is named in output

    @classmethod
    def for_neuron(cls, hook: str, neuron: int, d_model: int) -> "Objective":
        if not 0 <= neuron < d_model:
            raise UserError(f"--neuron {neuron} is out of range: {hook!r} has {d_model} dimensions (0..{d_model - 1})")
        return cls(hook=hook, neuron=neuron)

    @classmethod
    def for_latent(cls, sae: "SAE", latent: int, hook: str) -> "Objective":
        d_sae = int(sae.W_dec.shape[0])
        if not 0 <= latent < d_sae:
            raise UserError(f"--latent {latent} is out of range: this SAE has {d_sae} latents (0..{d_sae - 1})")
        return cls(hook=hook, sae=sae, latent=latent)

    @classmethod
    def for_direction(cls, direction: torch.Tensor, hook: str, label: str = "direction") -> "Objective":
        v = direction.detach().float().reshape(-1)
        n = float(v.norm())
        if not n > 0 or not torch.isfinite(v).all():
            raise UserError(f"{label}: the direction at {hook!r} is zero or not finite; it cannot be maximised")
        return cls(hook=hook, direction=v / n, label=label)

    @property
    def name(self) -> str:
        if self.sae is not None:
            return f"latent {self.latent} at {self.hook}"
        if self.direction is not None:
            return f"{self.label} at {self.hook}"
        return f"neuron {self.neuron} of {self.hook}"

    def soft(self, acts: torch.Tensor) -> torch.Tensor:
        """Differentiable score of activations [..., width] (grad-safe)."""
        acts = acts.float()
        if self.sae is not None:
            return self.sae.pre_acts(acts)[..., self.latent]
        if self.direction is not None:
            return acts @ self.direction.to(acts.device)
        return acts[..., self.neuron]

    @torch.no_grad()
    def evaluate(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activation, tie-break key) for activations [B, width] at the read position."""
        acts = acts.float()
        if self.sae is None:
            v = self.soft(acts)
            return v, v
        return self.sae.encode(acts)[:, self.latent], self.sae.pre_acts(acts)[:, self.latent]


def direction_objective(path: str, model: torch.nn.Module, hook: str | None = None) -> Objective:
    """An objective from a steering-vector file written by `saeforge steer --save` (one hook point, or
    the one named by `hook`); per-position (ActAdd) directions are refused."""
    from analysis.steer_files import load_safetensors
    sv = load_safetensors(path)
    points = {canonical_read(model, p): p for p in sv.points}
    if hook is None:
        if len(points) != 1:
            raise UserError(f"--direction {path!r} holds directions at {sv.points}; pick one with --hook")
        hook = next(iter(points))
    hook = canonical_read(model, hook)
    if hook not in points:
        raise UserError(f"--direction {path!r} has no direction at {hook!r}; it holds {sv.points}")
    v = sv.directions[points[hook]]
    if v.ndim != 1:
        raise UserError(f"--direction {path!r}: the direction at {hook!r} is per-position ({tuple(v.shape)}); "
                        f"save it with `saeforge steer --read last` or `--read mean` to search for it")
    width = read_width(model, hook)
    if v.numel() != width:
        raise UserError(f"--direction {path!r} has width {v.numel()} but {hook!r} of this model has {width}; "
                        f"pass the model the direction was made on (--model)")
    src = sv.meta.get("source")
    return Objective.for_direction(v, hook, label=f"direction {path}" + (f" ({src})" if src else ""))

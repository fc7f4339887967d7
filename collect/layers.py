"""Find a model's decoder blocks, attention, MLP, embedding and final norm without per-model code,
and resolve hook-point names (`layers.{i}.resid_post`, `embed`, `final_norm`, …) to modules.

Decoder blocks are found by guessing the template `prefix.{num}` shared by the most numbered
module names (the layer auto-matching method), preferring known ModuleList paths, and checking the
count against `config.num_hidden_layers`. Attention and MLP are found the same way with a filter.
Which norm feeds the MLP (whose input is `resid_mid`), and whether a block runs attention and MLP in
parallel, is read off a two-token forward through block 0 (`_probe_mlp_input`).

The template-guessing heuristic (`LAYER_GUESS_RE`, `guess_template`, `matching_layers`) follows
the layer matching of steering-vectors by David Chanin (MIT licence,
https://github.com/steering-vectors/steering-vectors, `layer_matching.py`), written anew here.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from saeforge.errors import UserError

log = logging.getLogger(__name__)

LAYER_GUESS_RE = re.compile(r"^(.+?)\.(\d+)(.*)$")
KNOWN_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                     "transformer.layers", "transformer.blocks", "model.language_model.layers", "layers")
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")  # forward order in a block
HOOK_POINT_RE = re.compile(r"^layers\.(-?\d+)\.(" + "|".join(SITES) + r")$")


def guess_template(names: list[str], keep: Callable[[str], bool] | None = None) -> str | None:
    """The template `prefix.{num}suffix` that matches most numbered module names, shortest first."""
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        m = LAYER_GUESS_RE.match(name)
        if m:
            guess = f"{m.group(1)}.{{num}}{m.group(3)}"
            if keep is None or keep(guess):
                counts[guess] += 1
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: kv[1] + 1 / len(kv[0]))[0]


def matching_layers(names: set[str], template: str) -> list[str]:
    """All module names `template.format(num=0), …` up to the first gap."""
    out: list[str] = []
    while template.format(num=len(out)) in names:
        out.append(template.format(num=len(out)))
    return out


def _num_layers(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    return None


@dataclass(frozen=True)
class Layout:
    """Module names of a model's parts, one entry per decoder block for attn and mlp."""
    blocks: list[str]
    attn: list[str]
    mlp: list[str]
    embed: str
    final_norm: str | None
    mlp_norm: list[str] = field(default_factory=list)  # the norm whose output each MLP reads ([] if none found)
    parallel: bool = False  # attention and MLP read the same block input (GPT-J, Falcon, NeoX…): no resid_mid

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _per_block(names: set[str], blocks: list[str], words: tuple[str, ...]) -> list[str]:
    """The shortest child of each block whose name contains one of `words` (same template for all)."""
    children = sorted({n[len(blocks[0]) + 1:] for n in names if n.startswith(blocks[0] + ".")}, key=len)
    for child in children:
        if "." not in child and any(w in child.lower() for w in words):
            if all(f"{b}.{child}" in names for b in blocks):
                return [f"{b}.{child}" for b in blocks]
    template = guess_template(sorted(names), lambda g: any(w in g.lower() for w in words))
    found = matching_layers(names, template) if template else []
    return found if len(found) == len(blocks) else []


def discover_layout(model: torch.nn.Module) -> Layout:
    """Find blocks, attention, MLP, embedding and final norm by their names and the config."""
    modules = dict(model.named_modules())
    names = set(modules)
    expected = _num_layers(model)
    blocks: list[str] = []
    for path in KNOWN_BLOCK_PATHS:
        for prefix in (path, f"model.{path}"):
            cand = matching_layers(names, prefix + ".{num}")
            if cand and (expected is None or len(cand) == expected) and isinstance(modules[prefix], torch.nn.ModuleList):
                blocks = cand
                break
        if blocks:
            break
    if not blocks:
        template = guess_template(sorted(names), lambda g: g.endswith("{num}"))
        blocks = matching_layers(names, template) if template else []
    if not blocks or (expected is not None and len(blocks) != expected):
        raise UserError(f"could not find the decoder blocks of {type(model).__name__}: found {len(blocks)} "
                        f"numbered modules, config says {expected}; this model is not supported")
    attn = _per_block(names, blocks, ("attn", "attention"))
    mlp = _per_block(names, blocks, ("mlp", "feed_forward", "ffn"))
    emb = model.get_input_embeddings()  # type: ignore[operator]  # HF PreTrainedModel method
    embed = next(n for n, m in modules.items() if m is emb)
    parent = blocks[0].rsplit(".", 2)[0]
    norms = [n for n in names if n.startswith(parent + ".") and n.count(".") == parent.count(".") + 1
             and re.search(r"norm|ln_f|ln_out", n.rsplit(".", 1)[-1])]
    final_norm = min(norms, key=len) if norms else None
    mlp_norm, parallel = _probe_mlp_input(model, modules, blocks, attn, mlp) if mlp else ([], False)
    return Layout(blocks=blocks, attn=attn, mlp=mlp, embed=embed, final_norm=final_norm, mlp_norm=mlp_norm,
                  parallel=parallel)


class _ProbeDone(Exception):
    pass


def _same(a: object, b: object, exact: bool) -> bool:
    """The same tensor object (exact), or equal values (a norm that copies or casts its output)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return a is b if exact else a.shape == b.shape and bool(torch.equal(a, b))


def _first_tensor(args: tuple, kwargs: dict) -> object:
    return args[0] if args else kwargs.get("hidden_states")


def _probe_mlp_input(model: torch.nn.Module, modules: dict[str, torch.nn.Module], blocks: list[str],
                     attn: list[str], mlp: list[str]) -> tuple[list[str], bool]:
    """Which norm feeds each block's MLP, and whether the MLP reads the block's input (parallel attention).

    Names alone cannot tell `post_attention_layernorm` in Llama (after attention) from the same name in
    GPT-NeoX's parallel blocks (on the block input), so a two-token forward through block 0 records
    tensors: the norm whose output the MLP receives, and whether that norm's input is the block's input.
    Its input is the residual after attention (`resid_mid`) in a sequential block. ([], False) when the
    probe cannot run (the point is then refused where asked for)."""
    b0, m0 = blocks[0], mlp[0]
    a0 = attn[0] if attn else None
    inside = [p for p in (m0, a0) if p]
    cands = {n: m for n, m in modules.items() if n.startswith(b0 + ".")
             and not any(n == p or n.startswith(p + ".") for p in inside)
             and re.search(r"norm|ln", n.rsplit(".", 1)[-1].lower()) and not any(True for _ in m.children())}
    seen: dict[str, object] = {}

    def at_block(mod: torch.nn.Module, args: tuple, kw: dict) -> None:
        seen.setdefault("block_in", _first_tensor(args, kw))

    def at_norm(name: str) -> Callable[..., None]:
        def fn(mod: torch.nn.Module, args: tuple, out: object) -> None:
            seen.setdefault(name, (args[0] if args else None, out))
        return fn

    handles = [modules[b0].register_forward_pre_hook(at_block, with_kwargs=True)]
    handles += [mod.register_forward_hook(at_norm(name)) for name, mod in cands.items()]

    def at_mlp(mod: torch.nn.Module, args: tuple, kw: dict) -> None:
        seen["mlp_in"] = _first_tensor(args, kw)
        raise _ProbeDone

    handles.append(modules[m0].register_forward_pre_hook(at_mlp, with_kwargs=True))
    emb = model.get_input_embeddings()  # type: ignore[operator]
    n_vocab = int(emb.weight.shape[0])  # two ordinary tokens (id 0 is often padding, whose embedding is 0)
    ids = torch.tensor([[n_vocab // 3, n_vocab // 2]], dtype=torch.long, device=emb.weight.device)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _ProbeDone:
        pass
    except Exception as e:  # noqa: BLE001 - an unusual model: resid_mid is then refused, nothing else changes
        log.debug("MLP-input probe of %s failed: %s", type(model).__name__, e)
        return [], False
    finally:
        for h in handles:
            h.remove()
    if "mlp_in" not in seen:
        return [], False
    block_in, mlp_in = seen.get("block_in"), seen["mlp_in"]
    for exact in (True, False):
        for name in cands:
            io = seen.get(name)
            if isinstance(io, tuple) and _same(io[1], mlp_in, exact):
                if _same(io[0], block_in, True) or _same(io[0], block_in, False):
                    return [], True
                child = name[len(b0) + 1:]
                if all(f"{b}.{child}" in modules for b in blocks):
                    return [f"{b}.{child}" for b in blocks], False
                return [], False
    return [], _same(mlp_in, block_in, True) or _same(mlp_in, block_in, False)


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point: canonical name, module name, and whether it reads the input."""
    name: str
    module: str
    layer: int          # block index; -1 for embed, n_layers for final_norm (for ordering)
    reads_input: bool   # resid_pre, resid_mid and mlp_in read a module's input (a forward pre-hook)
    inplace: bool = False  # resid_mid: edits write into the tensor, so the residual branch carries them too

    @property
    def site(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def hook_point_names(layout: Layout) -> list[str]:
    """Every hook point this model has, in forward order."""
    out = ["embed"]
    for i in range(layout.n_layers):
        out += [f"layers.{i}.resid_pre"]
        out += [f"layers.{i}.attn_out"] if layout.attn else []
        out += [f"layers.{i}.resid_mid"] if layout.mlp_norm else []
        out += [f"layers.{i}.mlp_in", f"layers.{i}.mlp_out"] if layout.mlp else []
        out += [f"layers.{i}.resid_post"]
    return out + (["final_norm"] if layout.final_norm else [])


def resolve_hook_point(layout: Layout, point: str) -> HookPoint:
    """`layers.-1.resid_post` → HookPoint('layers.29.resid_post', 'model.layers.29', 29, False)."""
    point = point.strip()
    if point == "embed":
        return HookPoint("embed", layout.embed, -1, False)
    if point == "final_norm":
        if layout.final_norm is None:
            raise UserError("hook point 'final_norm': this model has no final norm module that could be found")
        return HookPoint("final_norm", layout.final_norm, layout.n_layers, False)
    m = HOOK_POINT_RE.match(point)
    if not m:
        raise UserError(f"unknown hook point {point!r}; use layers.N.{'|'.join(SITES)}, "
                        f"embed or final_norm (N from 0 to {layout.n_layers - 1}, negative counts from the end)")
    i, site = int(m.group(1)), m.group(2)
    n = layout.n_layers
    if not -n <= i < n:
        raise UserError(f"layer {i} in hook point {point!r} is out of range: this model has {n} layers "
                        f"(use 0..{n - 1} or -{n}..-1)")
    i %= n
    name = f"layers.{i}.{site}"
    if site in ("resid_pre", "resid_post"):
        return HookPoint(name, layout.blocks[i], i, site == "resid_pre")
    if site == "resid_mid":
        if layout.parallel:
            raise UserError(f"hook point {point!r}: this model's blocks run attention and the MLP in parallel on the "
                            f"block's input, so there is no residual between them; use layers.{i}.resid_pre "
                            f"(what both read) or layers.{i}.mlp_in (what the MLP receives)")
        if not layout.mlp_norm:
            raise UserError(f"hook point {point!r}: the norm in front of this model's MLP could not be located; "
                            f"use layers.{i}.mlp_in (the MLP's input) or layers.{i}.resid_pre")
        return HookPoint(name, layout.mlp_norm[i], i, True, inplace=True)
    parts = layout.attn if site == "attn_out" else layout.mlp
    if not parts:
        raise UserError(f"hook point {point!r}: no {site.split('_')[0]} submodule was found in this model's blocks")
    return HookPoint(name, parts[i], i, site == "mlp_in")


def output_module(layout: Layout, point: HookPoint) -> str | None:
    """The module whose output is this hook point's tensor (None if none is): what tools that hook
    module outputs by name (SAELens's HF loader) need. mlp_in is the output of the norm in front of
    the MLP, resid_pre of block i > 0 the output of block i − 1; resid_mid and resid_pre of block 0
    are no module's output."""
    if not point.reads_input:
        return point.module
    if point.site == "mlp_in":
        return layout.mlp_norm[point.layer] if layout.mlp_norm else None
    if point.site == "resid_pre" and point.layer > 0:
        return layout.blocks[point.layer - 1]
    return None


def parse_hook_points(layout: Layout, points: str | list[str]) -> list[HookPoint]:
    """Resolve a comma-separated list or list of hook points; duplicates after resolution are dropped."""
    items = [p for p in (points.split(",") if isinstance(points, str) else points) if p.strip()]
    if not items:
        raise UserError("no hook points given; pass e.g. --hooks layers.6.resid_post")
    out: dict[str, HookPoint] = {}
    for p in items:
        hp = resolve_hook_point(layout, p)
        out.setdefault(hp.name, hp)
    return list(out.values())

"""Find a model's decoder blocks, attention, MLP, embedding and final norm without per-model code,
and resolve hook-point names (`layers.{i}.resid_post`, `embed`, `final_norm`, …) to modules.

Decoder blocks are found by guessing the template `prefix.{num}` shared by the most numbered
module names (the layer auto-matching method), preferring known ModuleList paths, and checking the
count against `config.num_hidden_layers`. Attention and MLP are found the same way with a filter.

The template-guessing heuristic (`LAYER_GUESS_RE`, `guess_template`, `matching_layers`) follows
the layer matching of steering-vectors by David Chanin (MIT licence,
https://github.com/steering-vectors/steering-vectors, `layer_matching.py`), written anew here.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from saeforge.errors import UserError

LAYER_GUESS_RE = re.compile(r"^(.+?)\.(\d+)(.*)$")
KNOWN_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                     "transformer.layers", "transformer.blocks", "model.language_model.layers", "layers")
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HOOK_POINT_RE = re.compile(r"^layers\.(-?\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$")


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
    return Layout(blocks=blocks, attn=attn, mlp=mlp, embed=embed, final_norm=final_norm)


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point: canonical name, module name, and whether it reads the input."""
    name: str
    module: str
    layer: int          # block index; -1 for embed, n_layers for final_norm (for ordering)
    reads_input: bool   # resid_pre reads the block's input (a forward pre-hook)


def hook_point_names(layout: Layout) -> list[str]:
    """Every hook point this model has, in forward order."""
    out = ["embed"]
    for i in range(layout.n_layers):
        out += [f"layers.{i}.resid_pre"]
        out += [f"layers.{i}.attn_out"] if layout.attn else []
        out += [f"layers.{i}.mlp_out"] if layout.mlp else []
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
        raise UserError(f"unknown hook point {point!r}; use layers.N.resid_pre|resid_post|attn_out|mlp_out, "
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
    parts = layout.attn if site == "attn_out" else layout.mlp
    if not parts:
        raise UserError(f"hook point {point!r}: no {site.split('_')[0]} submodule was found in this model's blocks")
    return HookPoint(name, parts[i], i, False)


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

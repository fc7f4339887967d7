"""Where steering directions come from: an SAE latent's decoder row, add/sub prompts read at a source
layer (ActAdd), the mean difference over contrastive pairs (CAA), or the first principal component of
the pair differences (repeng-style PCA).

A `SteeringVector` maps hook points to directions: `[d_model]` (added at every selected position) or
`[n_pos, d_model]` (ActAdd per-position: row p is added at absolute position p).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from collect.hooks import forward_to
from collect.layers import discover_layout, resolve_hook_point
from saeforge.errors import UserError

if TYPE_CHECKING:
    from sae.architectures import SAE

log = logging.getLogger(__name__)

READS = ("last", "mean", "per_position")
# The first token of any text is an attention sink whose residual norm is 5-200× that of the others
# (SmolLM2: ~800 vs ~100 at layer 6), whatever the token. Prompts are read after this one-token prefix
# so that "Love" is read as a word, not as a sink; the prefix's own positions are dropped ("last",
# "mean") or kept as zero rows ("per_position": add and sub share it, so its difference is zero).
READ_PREFIX = "\n"


@dataclass
class SteeringVector:
    """Directions per hook point plus where they came from.

    `meta` carries: source (a one-line description), model, source_point, d_model, coeff (the
    coefficient the user chose), norm_scale (typical residual norm at the inject point, for relative
    coefficients) and anything else JSON-able."""
    directions: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def points(self) -> list[str]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[-1])

    def per_position(self) -> bool:
        return any(v.ndim == 2 for v in self.directions.values())


def canonical_point(model: torch.nn.Module, layer: str | int, site: str = "resid_post") -> str:
    """`6` → `layers.6.resid_post`; a full hook point is resolved (negative indices allowed)."""
    text = str(layer).strip()
    if text.lstrip("-").isdigit():
        text = f"layers.{text}.{site}"
    return resolve_hook_point(discover_layout(model), text).name


# ---- SAE latent ---------------------------------------------------------------------------------

def _load_sae(sae_dir: str | Path) -> tuple["SAE", dict]:
    """The SAE module (sae.io.load_sae: local path or fsspec URL) and its cfg.json."""
    from sae.io import load_sae, read_cfg
    return load_sae(str(sae_dir)), read_cfg(str(sae_dir))


def _check_latent(sae: "SAE", sae_dir: str | Path, latent: int) -> None:
    n = int(sae.W_dec.shape[0])
    if not 0 <= latent < n:
        raise UserError(f"--latent {latent} is out of range: SAE {str(sae_dir)!r} has {n} latents (use 0..{n - 1})")


@dataclass
class SaeLatent:
    """One latent of an SAE module: `encode` reads its activation a(x) with the SAE's own inference rule
    (TopK's top-k, BatchTopK's saved threshold, JumpReLU's thresholds, ReLU), `d_dec` is its decoder row."""
    sae: "SAE"
    index: int

    @property
    def d_dec(self) -> torch.Tensor:
        return self.sae.W_dec[self.index].detach().float().cpu()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """a(x) for `x [..., d_in]` → `[...]` (float32, on x's device)."""
        if next(self.sae.parameters()).device != x.device:
            self.sae.to(x.device)
        return self.sae.encode(x.float())[..., self.index]


def load_sae_latent(sae_dir: str | Path, latent: int) -> tuple[SaeLatent, dict]:
    """One latent of the SAE in `sae_dir`, read through the SAE module itself (sae.io.load_sae).

    Only a plain SAE reads where it writes; a transcoder or crosscoder latent cannot be read at the
    point it is injected, so it is refused."""
    sae, cfg = _load_sae(sae_dir)
    _check_latent(sae, sae_dir, latent)
    if sae.cfg.kind != "sae":
        from sae.io import dict_points
        ins, outs = dict_points(cfg)
        raise UserError(f"--sae {str(sae_dir)!r} is a {sae.cfg.kind}: it reads {','.join(ins)} but writes "
                        f"{','.join(outs)}, so its latent cannot be read where it is injected; use --op add")
    return SaeLatent(sae, latent), cfg


def latent_directions(sae: "SAE", latent: int, outs: list[str]) -> dict[str, torch.Tensor]:
    """One latent's decoder row at each hook point the dictionary writes, in its layer order (an SAE's or
    transcoder's one point; a crosscoder's per-layer slice of the row at each of its layers)."""
    return {o: sae.decoder_rows(j)[latent].detach().float().cpu().clone() for j, o in enumerate(outs)}


def from_sae(model: torch.nn.Module | None, sae_dir: str | Path, latent: int,
             layers: list[str] | None = None) -> SteeringVector:
    """A steering vector from one latent's decoder row, injected where the dictionary writes by default:
    an SAE's hook point, a transcoder's target point; a crosscoder latent is one direction per layer,
    each at its own hook point."""
    from sae.io import dict_points
    sae, cfg = _load_sae(sae_dir)
    _check_latent(sae, sae_dir, latent)
    vec = sae.W_dec[latent].detach().float().cpu().clone()
    _, outs = dict_points(cfg)
    if len(outs) > 1:
        if layers:
            raise UserError(f"--sae {str(sae_dir)!r} is a crosscoder: latent {latent} writes one direction at each "
                            f"of {','.join(outs)}; drop --layer")
        d = sae.cfg.d_in
        parts = latent_directions(sae, latent, outs)
        if model is not None:
            parts = {canonical_point(model, o): v for o, v in parts.items()}
            if d != _d_model(model):
                raise UserError(f"--sae {str(sae_dir)!r}: d_in {d} does not match the model's d_model "
                                f"{_d_model(model)}; use a crosscoder trained on this model")
        return SteeringVector(parts, {"source": f"sae:{sae_dir}#{latent}", "source_point": ",".join(parts),
                                      "sae_model": cfg.get("model")})
    hp = outs[0] if outs else None
    if model is not None and hp:
        hp = canonical_point(model, hp)
    points = layers or ([hp] if hp else None)
    if not points:
        raise UserError(f"--sae {str(sae_dir)!r}: cfg.json names no hook_point; pass --layer")
    if model is not None:
        d = _d_model(model)
        if vec.shape[-1] != d:
            raise UserError(f"--sae {str(sae_dir)!r}: d_in {vec.shape[-1]} does not match the model's d_model {d}; "
                            f"use an SAE trained on this model")
    return SteeringVector({p: vec for p in points},
                          {"source": f"sae:{sae_dir}#{latent}", "source_point": hp, "sae_model": cfg.get("model")})


def _d_model(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


# ---- prompts: ActAdd and CAA ---------------------------------------------------------------------

@torch.no_grad()
def read_activations(model: torch.nn.Module, tokenizer, texts: list[str], point: str, read: str = "last",
                     prefix: str | None = READ_PREFIX) -> list[torch.Tensor]:
    """Activations at `point` for each text, one forward per text (no padding to get wrong).

    read: "last" → [d]; "mean" → mean over the text's tokens [d]; "per_position" → [n_prefix + n_tokens, d]
    (the prefix rows included, so row p is the activation at absolute position p)."""
    if read not in READS:
        raise UserError(f"--read {read!r} is not known; use one of {list(READS)}")
    out = []
    dev = next(model.parameters()).device
    for t in texts:
        pre = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
        body = tokenizer(t).input_ids
        if not body:
            raise UserError(f"prompt {t!r} has no tokens; pass a non-empty prompt")
        ids = torch.tensor([pre + body], device=dev)
        a = forward_to(model, ids, point)[point][0].float()
        out.append(a[-1] if read == "last" else a[len(pre):].mean(0) if read == "mean" else a)
    return out


def actadd(model: torch.nn.Module, tokenizer, add: list[str] | str, sub: list[str] | str, source: str,
           layers: list[str] | None = None, read: str = "last") -> SteeringVector:
    """ActAdd: Σ act(add) − Σ act(sub) read at `source`, injected at `layers` (default: the source).

    read="per_position" keeps one row per token (shorter prompts padded with zeros), as the
    llama.cpp steering branch did: row p is added at absolute position p."""
    add = [add] if isinstance(add, str) else list(add)
    sub = [sub] if isinstance(sub, str) else list(sub)
    if not add and not sub:
        raise UserError("ActAdd needs --add and/or --sub prompts")
    pos = read_activations(model, tokenizer, add, source, read)
    neg = read_activations(model, tokenizer, sub, source, read)
    if read == "per_position":
        n = max(a.shape[0] for a in pos + neg)
        d = (pos + neg)[0].shape[-1]
        vec = torch.zeros(n, d)
        for a in pos:
            vec[:a.shape[0]] += a
        for a in neg:
            vec[:a.shape[0]] -= a
    else:
        vec = sum(pos, torch.zeros(_d_model(model))) - sum(neg, torch.zeros(_d_model(model)))
    points = layers or [source]
    return SteeringVector({p: vec.clone() for p in points},
                          {"source": f"actadd:+{add}-{sub}", "source_point": source, "read": read})


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """JSONL with "positive" and "negative" string fields, one pair per line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--pairs {str(path)!r} not found; pass a JSONL file with \"positive\"/\"negative\" fields")
    pairs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["positive"]), str(row["negative"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--pairs {str(path)!r} line {n} is not a JSON object with \"positive\" and "
                            f"\"negative\" fields: {line[:80]!r}")
    if not pairs:
        raise UserError(f"--pairs {str(path)!r} holds no pairs; add lines like "
                        '{"positive": "I love it", "negative": "I hate it"}')
    return pairs


def pair_differences(model, tokenizer, pairs: list[tuple[str, str]], point: str, read: str = "last") -> torch.Tensor:
    """`[n_pairs, d]` activation differences positive − negative at `point`."""
    if read == "per_position":
        raise UserError("--read per_position is for --add/--sub; contrastive pairs use last or mean")
    pos = read_activations(model, tokenizer, [p for p, _ in pairs], point, read)
    neg = read_activations(model, tokenizer, [n for _, n in pairs], point, read)
    return torch.stack(pos) - torch.stack(neg)


def caa(model, tokenizer, pairs: list[tuple[str, str]] | str | Path, source: str, layers: list[str] | None = None,
        read: str = "last", method: str = "mean") -> SteeringVector:
    """Contrastive activation addition: the mean of positive − negative over pairs (method="mean"),
    or the first principal component of the differences scaled to their mean projection ("pca")."""
    src = str(pairs) if isinstance(pairs, (str, Path)) else f"{len(pairs)} pairs"
    if isinstance(pairs, (str, Path)):
        pairs = read_pairs(pairs)
    diffs = pair_differences(model, tokenizer, pairs, source, read)
    if method == "mean":
        vec = diffs.mean(0)
    elif method == "pca":
        vec = pca_direction(diffs)
    else:
        raise UserError(f"--method {method!r} is not known; use mean or pca")
    points = layers or [source]
    return SteeringVector({p: vec.clone() for p in points},
                          {"source": f"{'caa' if method == 'mean' else 'pca'}:{src}", "source_point": source,
                           "read": read, "n_pairs": len(pairs)})


def pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """First principal component of the differences, uncentred (as PCA over ±differences, which is what
    repeng's pca_diff sees), signed so that the differences project positively on average and scaled by
    that mean projection (so its size is comparable to the mean difference)."""
    if diffs.shape[0] < 2:
        return diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    pc = vh[0].float()
    proj = diffs @ pc
    if proj.mean() < 0:
        pc, proj = -pc, -proj
    return pc * proj.mean()

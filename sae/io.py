"""The SAE directory (DESIGN.md): `sae.safetensors` + `cfg.json`; it takes raw activations.

    from sae.io import load_sae
    sae = load_sae("sae_out")            # nn.Module
    f = sae.encode(x)                    # raw activations [..., d_in] -> latents [..., d_sae]
    x_hat = sae.decode(f)
    f, y_hat = sae.encode_decode(x)      # any kind: a skip-transcoder's output includes its skip term

Format version 2 holds every dictionary kind (cfg.json `kind`): `sae` (as version 1), `transcoder`
and `skip_transcoder` (W_enc reads `hook_point`, W_dec/b_dec write `target_hook_point`; a
skip-transcoder adds `W_skip [d_out, d_in]`), and `crosscoder` (`hook_points` in order, with
`W_enc [n_layers, d_in, d_sae]`, `W_dec [n_layers, d_sae, d_in]` — one decoder per layer —
`b_dec [n_layers, d_in]`; the module takes and returns the layers side by side, [.., n_layers·d_in]).
Every cfg.json records `hook_points` (what is read) and `output_hook_points` (what is written).

Directories may be local paths or fsspec URLs (`file://`, `memory://`, `s3://` with s3fs, …).
"""
from __future__ import annotations

import copy
import os
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from saeforge.errors import UserError
from saeforge.urls import (is_dir, is_file, is_local, join, local_path, makedirs, read_bytes, read_json, write_bytes,
                           write_json)
from sae.architectures import ARCHITECTURES, SAE, TOPK_FAMILY, ArchConfig, build_sae

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
FORMAT_VERSION = 2  # 1: autoencoders only (no `kind`); 2: + transcoders, skip-transcoders, crosscoders


def sae_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The file-format tensors (W_enc as [d_in, d_sae]; a crosscoder's per layer, see the module doc)."""
    c = sae.cfg
    t: dict[str, torch.Tensor] = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if c.n_layers > 1:
        L, d, n = c.n_layers, c.d_in, c.d_sae
        t["W_enc"] = sae.W_enc.reshape(L, d, n)
        t["W_dec"] = sae.W_dec.reshape(n, L, d).permute(1, 0, 2)
        t["b_dec"] = sae.b_dec.reshape(L, d)
    if sae.saves_threshold:
        t["threshold"] = typing.cast(torch.Tensor, sae.threshold)
    if c.skip:
        t["W_skip"] = sae.W_skip
    return {k: v.detach().float().cpu().contiguous() for k, v in t.items()}


def _load_tensors(sae: SAE, t: dict[str, torch.Tensor]) -> None:
    """Copy file-format tensors into the module (the inverse of sae_tensors)."""
    c = sae.cfg
    with torch.no_grad():
        if c.n_layers > 1:
            L, d, n = c.n_layers, c.d_in, c.d_sae
            sae.enc.copy_(t["W_enc"].reshape(L * d, n).t())
            sae.W_dec.copy_(t["W_dec"].permute(1, 0, 2).reshape(n, L * d))
            sae.b_dec.copy_(t["b_dec"].reshape(-1))
        else:
            sae.enc.copy_(t["W_enc"].t())
            sae.W_dec.copy_(t["W_dec"])
            sae.b_dec.copy_(t["b_dec"])
        sae.b_enc.copy_(t["b_enc"])
        if c.skip:
            sae.W_skip.copy_(t["W_skip"])
        if sae.saves_threshold:
            if c.arch == "jumprelu":
                typing.cast(torch.Tensor, sae.log_threshold).copy_(t["threshold"].clamp_min(1e-30).log())
            else:
                typing.cast(torch.Tensor, sae.threshold).copy_(t["threshold"])


def save_sae(sae: SAE, out_dir: str | os.PathLike[str], scale: float = 1.0,
             meta: dict[str, Any] | None = None,
             scales: tuple[list[float], list[float]] | None = None) -> Path | str:
    """Write an SAE trained on activations×scale so that the saved one takes raw activations.

    `scales` = (per input hook, per output hook) replaces `scale` for the other kinds (a transcoder's
    input and target, a crosscoder's layers). Both files are written whole (atomically for local
    paths); the weights first, so a crash never leaves a cfg.json describing weights that are not
    there. Returns the directory: a Path for a local path or file:// URL, the URL string otherwise."""
    s_in, s_out = scales if scales is not None else ([scale], [scale])
    folded = copy.deepcopy(sae).cpu()
    if any(v != 1.0 for v in [*s_in, *s_out]):
        folded.fold_scales(list(s_in), list(s_out))
    makedirs(out_dir)
    write_bytes(join(out_dir, WEIGHTS), safetensors.torch.save(sae_tensors(folded)))
    a = sae.cfg
    meta = dict(meta or {})
    ins = list(meta.get("hook_points") or ([meta["hook_point"]] if meta.get("hook_point") else []))
    outs = list(meta.get("output_hook_points") or ([meta["target_hook_point"]] if meta.get("target_hook_point")
                                                   else ins))
    norm: dict[str, Any] = {"method": "unit_mean_squared_norm", "scale": float(s_in[0]), "folded_into_weights": True}
    if scales is not None and (len(s_in) > 1 or s_out != s_in):
        norm["input_scales"], norm["output_scales"] = [float(v) for v in s_in], [float(v) for v in s_out]
    cfg = {"format_version": FORMAT_VERSION, "kind": a.kind, "architecture": a.arch, "d_in": a.d_in,
           "d_sae": a.d_sae, "k": a.k if a.arch in TOPK_FAMILY else None, "normalization": norm,
           "arch_config": asdict(a), **meta,
           **({"hook_points": ins, "output_hook_points": outs} if ins else {})}
    write_json(join(out_dir, CONFIG), cfg, indent=2)
    return Path(local_path(out_dir)) if is_local(out_dir) else str(out_dir)


def read_cfg(sae_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """cfg.json of an SAE directory, with one clear line for a missing, foreign or damaged one."""
    if not (is_file(join(sae_dir, CONFIG)) and is_file(join(sae_dir, WEIGHTS))):
        what = "a file" if is_file(sae_dir) else ("a directory without " + CONFIG + "/" + WEIGHTS if is_dir(sae_dir)
                                                  else "not found")
        raise UserError(f"{str(sae_dir)!r} is not an SAE directory ({what}; it needs {CONFIG} and {WEIGHTS}); "
                        f"pass the --out of a finished `saeforge train`")
    cfg = read_json(join(sae_dir, CONFIG), what="SAE config")
    if not isinstance(cfg, dict):
        raise UserError(f"{str(sae_dir)!r}/{CONFIG} is not a JSON object; the SAE directory is damaged")
    return cfg


def arch_config(cfg: dict[str, Any], sae_dir: str | os.PathLike[str] = "") -> ArchConfig:
    """The ArchConfig a cfg.json describes, refusing anything it cannot rebuild faithfully."""
    where = f"{str(sae_dir)!r}/{CONFIG}"
    raw = cfg.get("arch_config")
    if raw is None:  # written without arch_config: rebuild from the top-level fields
        raw = {k: cfg.get(k) for k in ("architecture", "d_in", "d_sae", "k")}
        raw["arch"] = raw.pop("architecture")
        if raw.get("k") is None:
            raw.pop("k")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: arch_config is not a JSON object; the SAE directory is damaged")
    raw = {k: v for k, v in raw.items() if not (k == "extra" and not v)}  # an always-empty field of saeforge 0.1
    known = {f.name for f in fields(ArchConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where} has arch_config fields {unknown} that this saeforge does not know (written by a "
                        f"newer version?); upgrade saeforge to load it")
    missing = [k for k in ("arch", "d_in", "d_sae") if raw.get(k) is None]
    if raw.get("arch") in TOPK_FAMILY and not raw.get("k"):
        missing.append("k")
    if raw.get("arch") == "matryoshka" and not raw.get("group_sizes"):
        missing.append("group_sizes")
    if missing:
        raise UserError(f"{where} does not record {missing}; the SAE cannot be rebuilt faithfully from it")
    if raw["arch"] not in ARCHITECTURES:
        raise UserError(f"{where} names architecture {raw['arch']!r}, which this saeforge does not know "
                        f"({', '.join(sorted(ARCHITECTURES))}); upgrade saeforge to load it")
    a = ArchConfig(**raw)
    if (a.arch == "matryoshka") != (a.group_sizes is not None) or (a.group_sizes and sum(a.group_sizes) != a.d_sae) \
            or (a.arch == "crosscoder") != (a.n_layers > 1) \
            or (a.skip and not a.transcoder) or (a.n_layers > 1 and a.transcoder):
        raise UserError(f"{where}: arch_config is inconsistent (group_sizes {a.group_sizes} for d_sae {a.d_sae}, "
                        f"n_layers {a.n_layers} for {a.arch}, transcoder {a.transcoder}, skip {a.skip}); the SAE "
                        f"directory is damaged")
    return a


def load_sae(sae_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE module from a directory written by `save_sae` (eval mode, raw-activation units)."""
    cfg = read_cfg(sae_dir)
    arch = arch_config(cfg, sae_dir)
    sae = build_sae(arch)
    try:
        t = safetensors.torch.load(read_bytes(join(sae_dir, WEIGHTS)))
    except (safetensors.SafetensorError, ValueError, OSError) as e:
        raise UserError(f"{str(sae_dir)!r}/{WEIGHTS} cannot be read ({e}); it is truncated or damaged: restore it "
                        f"or train again") from None
    want = {k: tuple(v.shape) for k, v in sae_tensors(sae).items()}
    got = {k: tuple(v.shape) for k, v in t.items()}
    if got != want:
        raise UserError(f"{str(sae_dir)!r}/{WEIGHTS} holds tensors {got} but {CONFIG} describes {want}; the SAE "
                        f"directory is inconsistent")
    _load_tensors(sae, t)
    return sae.to(device).eval()


def dict_points(cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(hook points read, hook points written) of a cfg.json, for every kind and format version
    ([], []) when it records none."""
    hook = cfg.get("hook_point") or cfg.get("hook") or (cfg.get("config") or {}).get("hook")
    ins = list(cfg.get("hook_points") or ([hook] if hook else []))
    outs = list(cfg.get("output_hook_points") or ([cfg["target_hook_point"]] if cfg.get("target_hook_point") else ins))
    return ins, outs


def sae_summary(sae_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Hook point, model, hash and shape recorded in an SAE directory's cfg.json."""
    cfg = read_cfg(sae_dir)
    ins, outs = dict_points(cfg)
    return {"hook_point": ins[0] if len(ins) == 1 else None, "model": cfg.get("model"),
            "model_hash": cfg.get("model_hash"), "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"),
            "d_sae": cfg.get("d_sae"), "k": cfg.get("k"), "kind": cfg.get("kind", "sae"), "hook_points": ins,
            "output_hook_points": outs}


def check_store_points(cfg: dict[str, Any], store: Any, sae_dir: str | os.PathLike[str]
                       ) -> tuple[list[str], list[str]]:
    """(hook points read, hook points written) for this dictionary, after checking the store holds them
    and comes from the same model, at the same width.

    The one SAE-vs-store check: every command that reads an SAE together with a store calls it."""
    ins, outs = dict_points(cfg)
    if not ins:
        if len(store.hooks) != 1:
            raise UserError(f"{str(sae_dir)!r}/cfg.json records no hook_point and store {store.path!r} holds "
                            f"{store.hooks}; pass an SAE directory written by `saeforge train`")
        ins = outs = [store.hooks[0]]
    for hook in dict.fromkeys([*ins, *outs]):
        if hook not in store.hooks:
            raise UserError(f"the SAE in {str(sae_dir)!r} was trained on hook {hook!r}, but store {store.path!r} "
                            f"holds {store.hooks}; pass a store collected at {hook} (saeforge collect --hooks {hook})")
    mh = cfg.get("model_hash")
    if mh and mh != store.model_hash:
        raise UserError(f"the SAE in {str(sae_dir)!r} was trained on model {cfg.get('model')!r} (weights hash "
                        f"{mh[:12]}) but store {store.path!r} comes from {store.model_spec!r} (hash "
                        f"{str(store.model_hash)[:12]}); pass a store collected with the SAE's model")
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != store.d_model:
        raise UserError(f"the SAE in {str(sae_dir)!r} takes d_in={cfg.get('d_in')} but store {store.path!r} has "
                        f"d_model={store.d_model}; pass a store of the SAE's model and hook")
    return ins, outs

"""The SAE directory (DESIGN.md): `sae.safetensors` + `cfg.json`; it takes raw activations.

    from sae.io import load_sae
    sae = load_sae("sae_out")            # nn.Module
    f = sae.encode(x)                    # raw activations [..., d_in] -> latents [..., d_sae]
    x_hat = sae.decode(f)

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
from sae.architectures import SAE, ArchConfig, build_sae

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"


def sae_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The file-format tensors (W_enc as [d_in, d_sae])."""
    t: dict[str, torch.Tensor] = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.saves_threshold:
        t["threshold"] = typing.cast(torch.Tensor, sae.threshold)
    return {k: v.detach().float().cpu().contiguous() for k, v in t.items()}


def save_sae(sae: SAE, out_dir: str | os.PathLike[str], scale: float = 1.0,
             meta: dict[str, Any] | None = None) -> Path | str:
    """Write an SAE trained on activations×scale so that the saved one takes raw activations.

    Both files are written whole (atomically for local paths); the weights first, so a crash
    never leaves a cfg.json describing weights that are not there. Returns the directory: a Path
    for a local path or file:// URL, the URL string otherwise."""
    folded = copy.deepcopy(sae).cpu()
    if scale != 1.0:
        folded.fold_input_scale(scale)
    makedirs(out_dir)
    write_bytes(join(out_dir, WEIGHTS), safetensors.torch.save(sae_tensors(folded)))
    a = sae.cfg
    cfg = {"architecture": a.arch, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k if a.arch in ("topk", "batchtopk") else None,
           "normalization": {"method": "unit_mean_squared_norm", "scale": scale, "folded_into_weights": True},
           "arch_config": asdict(a), **(meta or {})}
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
    if raw.get("arch") in ("topk", "batchtopk") and not raw.get("k"):
        missing.append("k")
    if missing:
        raise UserError(f"{where} does not record {missing}; the SAE cannot be rebuilt faithfully from it")
    return ArchConfig(**raw)


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
    with torch.no_grad():
        sae.enc.copy_(t["W_enc"].t())
        sae.b_enc.copy_(t["b_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
        if sae.saves_threshold:
            if arch.arch == "jumprelu":
                typing.cast(torch.Tensor, sae.log_threshold).copy_(t["threshold"].clamp_min(1e-30).log())
            else:
                typing.cast(torch.Tensor, sae.threshold).copy_(t["threshold"])
    return sae.to(device).eval()


def sae_summary(sae_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Hook point, model, hash and shape recorded in an SAE directory's cfg.json."""
    cfg = read_cfg(sae_dir)
    hook = cfg.get("hook_point") or cfg.get("hook") or (cfg.get("config") or {}).get("hook")
    return {"hook_point": hook, "model": cfg.get("model"), "model_hash": cfg.get("model_hash"),
            "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
            "k": cfg.get("k")}


def check_store_match(cfg: dict[str, Any], store: Any, sae_dir: str | os.PathLike[str]) -> str:
    """The hook point to read for this SAE, after checking the store comes from the same model, hook and width.

    The one SAE-vs-store check: every command that reads an SAE together with a store calls it."""
    hook = cfg.get("hook_point") or cfg.get("hook") or (cfg.get("config") or {}).get("hook")
    if not hook:
        if len(store.hooks) != 1:
            raise UserError(f"{str(sae_dir)!r}/cfg.json records no hook_point and store {store.path!r} holds "
                            f"{store.hooks}; pass an SAE directory written by `saeforge train`")
        hook = store.hooks[0]
    if hook not in store.hooks:
        raise UserError(f"the SAE in {str(sae_dir)!r} was trained on hook {hook!r}, but store {store.path!r} holds "
                        f"{store.hooks}; pass a store collected at {hook} (saeforge collect --hooks {hook})")
    mh = cfg.get("model_hash")
    if mh and mh != store.model_hash:
        raise UserError(f"the SAE in {str(sae_dir)!r} was trained on model {cfg.get('model')!r} (weights hash "
                        f"{mh[:12]}) but store {store.path!r} comes from {store.model_spec!r} (hash "
                        f"{str(store.model_hash)[:12]}); pass a store collected with the SAE's model")
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != store.d_model:
        raise UserError(f"the SAE in {str(sae_dir)!r} takes d_in={cfg.get('d_in')} but store {store.path!r} has "
                        f"d_model={store.d_model}; pass a store of the SAE's model and hook")
    return str(hook)

"""The SAE directory (DESIGN.md): `sae.safetensors` + `cfg.json`; it takes raw activations.

    from sae.io import load_sae
    sae = load_sae("sae_out")            # nn.Module
    f = sae.encode(x)                    # raw activations [..., d_in] -> latents [..., d_sae]
    x_hat = sae.decode(f)

Directories may be local paths or fsspec URLs (`file://`, `memory://`, `s3://` with s3fs, …).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import safetensors.torch
from safetensors.torch import load_file, save_file

from saeforge.errors import UserError
from saeforge.urls import resolve
from sae.architectures import SAE, ArchConfig, build_sae

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"


def sae_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The file-format tensors (W_enc as [d_in, d_sae])."""
    t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.saves_threshold:
        t["threshold"] = sae.threshold
    return {k: v.detach().float().cpu().contiguous() for k, v in t.items()}


def save_sae(sae: SAE, out_dir: str | os.PathLike, scale: float = 1.0, meta: dict[str, Any] | None = None) -> Path:
    """Write an SAE trained on activations×scale so that the saved one takes raw activations.

    Returns the directory: a Path for a local path or file:// URL, the URL string otherwise."""
    folded = copy.deepcopy(sae).cpu()
    if scale != 1.0:
        folded.fold_input_scale(scale)
    fs, root = resolve(out_dir)
    if fs is None:
        out = Path(root)
        out.mkdir(parents=True, exist_ok=True)
        save_file(sae_tensors(folded), str(out / (WEIGHTS + ".tmp")))
        os.replace(out / (WEIGHTS + ".tmp"), out / WEIGHTS)
    else:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{WEIGHTS}", safetensors.torch.save(sae_tensors(folded)))
    a = sae.cfg
    cfg = {"architecture": a.arch, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k if a.arch in ("topk", "batchtopk") else None,
           "normalization": {"method": "unit_mean_squared_norm", "scale": scale, "folded_into_weights": True},
           "arch_config": asdict(a), **(meta or {})}
    text = json.dumps(cfg, indent=2, default=str)
    if fs is None:
        (out / CONFIG).write_text(text)
        return out
    with fs.open(f"{root}/{CONFIG}", "w") as f:
        f.write(text)
    return str(out_dir)  # type: ignore[return-value]


def read_cfg(sae_dir: str | os.PathLike) -> dict[str, Any]:
    fs, root = resolve(sae_dir)
    if fs is None:
        d = Path(root)
        ok = (d / CONFIG).is_file() and (d / WEIGHTS).is_file()
    else:
        ok = fs.isfile(f"{root}/{CONFIG}") and fs.isfile(f"{root}/{WEIGHTS}")
    if not ok:
        raise UserError(f"{str(sae_dir)!r} is not an SAE directory (needs {CONFIG} and {WEIGHTS}); "
                        f"pass the --out of a finished `saeforge train`")
    return json.loads((d / CONFIG).read_text() if fs is None else fs.cat_file(f"{root}/{CONFIG}").decode())


def load_sae(sae_dir: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE module from a directory written by `save_sae` (eval mode, raw-activation units)."""
    cfg = read_cfg(sae_dir)
    known = {f.name for f in fields(ArchConfig)}
    arch = ArchConfig(**{k: v for k, v in cfg.get("arch_config", {}).items() if k in known}) if "arch_config" in cfg \
        else ArchConfig(arch=cfg["architecture"], d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=cfg.get("k") or 0)
    sae = build_sae(arch)
    fs, root = resolve(sae_dir)
    t = load_file(str(Path(root) / WEIGHTS)) if fs is None else safetensors.torch.load(fs.cat_file(f"{root}/{WEIGHTS}"))
    with torch.no_grad():
        sae.enc.copy_(t["W_enc"].t())
        sae.b_enc.copy_(t["b_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
        if sae.saves_threshold:
            if arch.arch == "jumprelu":
                sae.log_threshold.copy_(t["threshold"].clamp_min(1e-30).log())
            else:
                sae.threshold.copy_(t["threshold"])
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

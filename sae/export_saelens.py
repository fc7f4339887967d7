"""Write an SAE directory in SAELens's on-disk format (`SAE.load_from_disk(dir)` loads it).

SAELens ≥ 6 reads `cfg.json` (d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, architecture, k, metadata{model_name, hook_name, …})
and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold).
Our normalisation is already folded into the weights, so `normalize_activations` is "none".
Inference rules map as: topk → topk; relu → standard; jumprelu → jumprelu; batchtopk →
jumprelu with its saved global threshold (SAELens does the same when it saves a BatchTopK SAE).
Older field names (hook_name, model_name, hook_layer, context_size, activation_fn…) are written
at the top level too for SAELens < 6 and other tools that read them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from saeforge.errors import UserError
from sae.io import WEIGHTS, read_cfg

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
SAELENS_VERSION = "6.0.0"  # the config schema we write


def _hook_layer(hook: str) -> int | None:
    m = re.match(r"layers\.(-?\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    arch = SAELENS_ARCH[cfg["architecture"]]
    train_cfg = cfg.get("config", {})
    store_attrs = cfg.get("store_attrs", {}) or {}
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": cfg.get("model"), "hook_name": cfg.get("hook_point"), "hook_head_index": None,
            "prepend_bos": True, "context_size": store_attrs.get("context"),
            "dataset_path": cfg.get("store"), "model_class_name": "HookedTransformer",
            "exported_by": "saeforge", "model_hash": cfg.get("model_hash")}
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": meta,
        # pre-6.0 names, ignored by SAELens 6
        "model_name": meta["model_name"], "hook_name": meta["hook_name"], "hook_point": meta["hook_name"],
        "hook_layer": _hook_layer(cfg.get("hook_point", "")), "hook_head_index": None,
        "context_size": meta["context_size"], "prepend_bos": True, "dataset_path": cfg.get("store"),
        "activation_fn": "topk" if arch == "topk" else "relu", "finetuning_scaling_factor": False,
        "sae_lens_training_version": None, "training_tokens": cfg.get("training_tokens"),
        "seed": train_cfg.get("seed"),
    }
    if arch == "topk":
        out["k"] = cfg["k"]
        out["rescale_acts_by_decoder_norm"] = False
        out["activation_fn_kwargs"] = {"k": cfg["k"]}
    return out


def export_saelens(sae_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a saeforge SAE directory into a SAELens folder; returns the folder."""
    cfg = read_cfg(sae_dir)
    if cfg["architecture"] not in SAELENS_ARCH:
        raise UserError(f"architecture {cfg['architecture']!r} has no SAELens equivalent")
    t = load_file(str(Path(sae_dir) / WEIGHTS))
    weights = {k: t[k].float().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if SAELENS_ARCH[cfg["architecture"]] == "jumprelu":
        weights["threshold"] = t["threshold"].float().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / SAELENS_WEIGHTS))
    (out / "cfg.json").write_text(json.dumps(saelens_config(cfg), indent=2, default=str))
    return out

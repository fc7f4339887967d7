"""Write an SAE directory in SAELens's on-disk format (`SAE.load_from_disk(dir)` loads it).

SAELens ≥ 6 reads `cfg.json` (d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, architecture, k, metadata{model_name, hook_name, …})
and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold).
Our normalisation is already folded into the weights, so `normalize_activations` is "none".
Inference rules map as: topk → topk; relu → standard; jumprelu → jumprelu; batchtopk →
jumprelu with its saved global threshold (SAELens does the same when it saves a BatchTopK SAE);
Matryoshka BatchTopK → jumprelu the same way (its inference rule is BatchTopK's; the nesting is a
training objective, kept in the latent order). Transcoders and skip-transcoders of those two kinds
→ SAELens's jumprelu_transcoder / jumprelu_skip_transcoder (d_out, W_skip [d_out, d_in], no b_dec
centring of the input: our b_in is folded into b_enc at save), with `hook_name` the module whose
output is the input point and `hook_name_out` the target's (the store's `hook_outputs`). Refused
with one line: TopK transcoders (SAELens's transcoders are ReLU or JumpReLU; a per-token top-k has
no threshold to carry) and crosscoders (SAELens has no crosscoder class).
Older field names (hook_name, model_name, hook_layer, context_size, activation_fn…) are written
at the top level too for SAELens < 6 and other tools that read them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import safetensors.torch

from saeforge.errors import UserError
from saeforge.urls import join, makedirs, write_bytes, write_json
from sae.io import dict_points, load_sae, read_cfg, sae_tensors

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu"}
SAELENS_VERSION = "6.0.0"  # the config schema we write
SAELENS_TRANSCODER = {"transcoder": "jumprelu_transcoder", "skip_transcoder": "jumprelu_skip_transcoder"}
THRESHOLD_ARCHS = ("batchtopk", "matryoshka")  # transcoders SAELens can run: a saved global threshold


def _hook_layer(hook: str) -> int | None:
    m = re.match(r"layers\.(-?\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def _saelens_hook(cfg: dict[str, Any], sae_dir: str) -> str:
    """The module whose output SAELens's AutoModelForCausalLM loader hooks for this SAE's hook point.

    SAELens hooks module outputs of the HF model (untupled) by module name; saeforge's
    resid_post/attn_out/mlp_out are exactly such outputs, and the store recorded their modules."""
    hook = str(cfg.get("hook_point") or "")
    modules = (cfg.get("store_attrs") or {}).get("hook_modules") or {}
    site = hook.rsplit(".", 1)[-1]
    if site not in ("resid_post", "attn_out", "mlp_out", "embed") or hook not in modules:
        raise UserError(f"the SAE in {sae_dir!r} reads {hook!r}, which is not the output of one module of the HF "
                        f"model, so SAELens cannot hook it; SAELens export supports resid_post, attn_out and "
                        f"mlp_out hook points (e.g. layers.{{i-1}}.resid_post instead of layers.{{i}}.resid_pre)")
    return str(modules[hook])


def _module_output(cfg: dict[str, Any], point: str, sae_dir: str) -> str:
    """The HF module whose output is `point`, as the store recorded it (for a transcoder's two points)."""
    outputs = (cfg.get("store_attrs") or {}).get("hook_outputs")
    if outputs is None:
        raise UserError(f"{sae_dir!r} was trained on a store that does not record which module outputs each hook "
                        f"point (collected by an older saeforge); collect the store again to export this transcoder")
    module = outputs.get(point)
    if not module:
        raise UserError(f"{point!r} is no module's output in this model, so SAELens cannot hook it; export "
                        f"transcoders between points such as layers.i.mlp_in and layers.i.mlp_out")
    return str(module)


def saelens_config(cfg: dict[str, Any], sae_dir: str = "") -> dict[str, Any]:
    kind = cfg.get("kind", "sae")
    arch = SAELENS_TRANSCODER[kind] if kind in SAELENS_TRANSCODER else SAELENS_ARCH[cfg["architecture"]]
    train_cfg = cfg.get("config", {})
    store_attrs = cfg.get("store_attrs", {}) or {}
    if "prepend_bos" not in store_attrs:
        raise UserError(f"{sae_dir!r}/cfg.json does not record whether the store's sequences start with BOS "
                        f"(saved by an older saeforge); train it again to export it")
    prepend_bos = bool(store_attrs["prepend_bos"])
    transcoder = kind in SAELENS_TRANSCODER
    hook_name = _module_output(cfg, cfg["hook_point"], sae_dir) if transcoder else _saelens_hook(cfg, sae_dir)
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": cfg.get("model"), "hook_name": hook_name, "hook_head_index": None,
            "prepend_bos": prepend_bos, "context_size": store_attrs.get("context"),
            "dataset_path": cfg.get("store"), "model_class_name": "AutoModelForCausalLM",
            "model_from_pretrained_kwargs": {}, "exported_by": "saeforge", "saeforge_hook_point": cfg.get("hook_point"),
            "model_hash": cfg.get("model_hash"), "model_class": store_attrs.get("model_class")}
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": meta,
        # pre-6.0 names, ignored by SAELens 6
        "model_name": meta["model_name"], "hook_name": hook_name, "hook_point": hook_name,
        "hook_layer": _hook_layer(cfg.get("hook_point", "")), "hook_head_index": None,
        "context_size": meta["context_size"], "prepend_bos": prepend_bos, "dataset_path": cfg.get("store"),
        "model_class_name": "AutoModelForCausalLM",
        "activation_fn": "topk" if arch == "topk" else "relu", "finetuning_scaling_factor": False,
        "sae_lens_training_version": None, "training_tokens": cfg.get("training_tokens"),
        "seed": cfg.get("seed", train_cfg.get("seed")),  # this SAE's seed (a sweep's config holds a list)
    }
    if transcoder:
        target = dict_points(cfg)[1][0]
        meta.update(hook_name_out=_module_output(cfg, target, sae_dir), saeforge_target_hook_point=target)
        out.update(d_out=int(cfg.get("d_out") or cfg["d_in"]), apply_b_dec_to_input=False,
                   hook_name_out=meta["hook_name_out"])
    if arch == "topk":
        out["k"] = cfg["k"]
        out["rescale_acts_by_decoder_norm"] = False
        out["activation_fn_kwargs"] = {"k": cfg["k"]}
    return out


def export_saelens(sae_dir: str | Path, out_dir: str | Path) -> str:
    """Convert a saeforge SAE directory (path or URL) into a SAELens folder (path or URL); returns it."""
    cfg = read_cfg(sae_dir)
    kind = cfg.get("kind", "sae")
    if kind == "crosscoder":
        raise UserError(f"{str(sae_dir)!r} holds a crosscoder; SAELens has no crosscoder class (use the saeforge "
                        f"directory with load_sae)")
    if kind in SAELENS_TRANSCODER and cfg["architecture"] not in THRESHOLD_ARCHS:
        raise UserError(f"{str(sae_dir)!r} holds a {cfg['architecture']} {kind.replace('_', '-')}; SAELens's "
                        f"transcoders are ReLU or JumpReLU, with no per-token top-k; train it with --arch batchtopk "
                        f"(exported as {SAELENS_TRANSCODER[kind]}) or use the directory with load_sae")
    if cfg["architecture"] not in SAELENS_ARCH:
        raise UserError(f"architecture {cfg['architecture']!r} has no SAELens equivalent")
    scfg = saelens_config(cfg, str(sae_dir))
    sae = load_sae(sae_dir)  # checks the weights against cfg.json
    t = sae_tensors(sae)
    weights = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if SAELENS_ARCH[cfg["architecture"]] == "jumprelu":
        weights["threshold"] = t["threshold"]
    if "W_skip" in t:
        weights["W_skip"] = t["W_skip"]
    makedirs(out_dir)
    write_bytes(join(out_dir, SAELENS_WEIGHTS), safetensors.torch.save(weights))
    write_json(join(out_dir, "cfg.json"), scfg, indent=2)
    return str(out_dir)

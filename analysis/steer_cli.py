"""`saeforge steer`: build a steering direction (SAE latent, --add/--sub prompts, contrastive pairs, or a
saved file), print base and steered generations side by side, sweep coefficients, and save the
direction as .safetensors / .npy / .bin / llama.cpp control-vector GGUF.

    saeforge steer --model smollm2-135m --add "Love" --sub "Hate" --source-layer 4 --layer 6 --coeff 1 \\
        --prompt "I hate you because" --max-new-tokens 40 --seed 0 --sweep 0,2,4,8 --gguf love.gguf
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence


from saeforge.config import config_dict, option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError
from saeforge.progress import progress
from collect.model import ModelDtype

log = logging.getLogger(__name__)


@dataclass
class SteerConfig:
    model: str = option("smollm2-135m", "model spec (alias, HF dir, .gguf, hub name)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: ModelDtype = option("float32", "model compute dtype")
    # sources (exactly one)
    sae: str | None = option(None, "SAE directory: steer along --latent's decoder row")
    latent: int | None = option(None, "SAE latent index")
    add: str | None = option(None, "ActAdd: prompt whose activation is added (e.g. 'Love')")
    sub: str | None = option(None, "ActAdd: prompt whose activation is subtracted (e.g. 'Hate')")
    pairs: str | None = option(None, "CAA: JSONL with 'positive'/'negative' fields")
    load: str | None = option(None, "a .safetensors steering vector saved with --save")
    method: Literal["mean", "pca"] = option("mean", "--pairs: mean (CAA) or pca (repeng-style)")
    read: Literal["last", "mean", "per_position"] = option("last", "read prompts at the last token, the mean over tokens, or "
                                                  "per_position (ActAdd rows added at positions 0..n-1)")
    source_layer: str | None = option(None, "layer (or hook point) the direction is read at; "
                                                               "default: each --layer")
    # where and how
    layer: str | None = option(None, "inject layer(s): 6, 4,6,8 or a hook point; a bare number "
                                                        "means layers.N.resid_post; default: the SAE's hook point, "
                                                        "the saved file's, or 6")
    coeff: float = option(1.0, "multiplier of the raw direction (add), or the clamp value "
                                                  "(clamp); SmolLM2 Love−Hate: 0.5-2 works, 4+ breaks text")
    coeff_relative: bool = option(False, "coeff × typical residual norm × unit direction")
    norm_scale: float | None = option(None, "typical residual norm for --coeff-relative")
    store: str | None = option(None, "activation store whose norm_median gives the norm scale")
    op: Literal["add", "ablate", "clamp"] = option("add", "add the direction, ablate it, or clamp an SAE latent")
    positions: Literal["all", "prompt", "generated"] = option("all", "positions steered")
    skip_first: int = option(0, "leave absolute positions below this alone (1 spares the "
                                                   "attention-sink first token; llama.cpp steers it)")
    # generation and evaluation
    prompt: str = option("I hate you because", "prompt to continue")
    chat: bool = option(False, "wrap the prompt in the model's chat template")
    max_new_tokens: int = option(40, "tokens to generate")
    seed: int = option(0, "sampling seed (same for base and steered)")
    temperature: float = option(0.8, "sampling temperature; 0 = greedy")
    sweep: list[float] = option([], "coefficients to tabulate, e.g. 0,2,4,8")
    targets: str = option(" love, happy, great", "comma-separated target words for Δ log p")
    neutral_file: str | None = option(None, "neutral sentences (one per line) for the KL")
    no_generate: bool = option(False, "skip the side-by-side generations")
    # outputs
    save: str | None = option(None, "write the direction as .safetensors with metadata")
    npy: str | None = option(None, "write coeff × direction as float32 .npy")
    bin: str | None = option(None, "write coeff × direction as raw float32 (numpy.fromfile)")
    gguf: str | None = option(None, "write a llama.cpp control-vector GGUF (coeff × direction)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        sources = [n for n, v in (("--sae", self.sae), ("--add/--sub", self.add or self.sub),
                                  ("--pairs", self.pairs), ("--load", self.load)) if v]
        if len(sources) != 1:
            raise UserError(f"give exactly one direction source: --sae DIR --latent I, --add/--sub, --pairs FILE or "
                            f"--load FILE (got {sources or 'none'})")
        if self.sae and self.latent is None:
            raise UserError("--sae needs --latent I (the latent whose decoder row to steer along)")
        if self.op == "clamp" and not self.sae:
            raise UserError("--op clamp sets an SAE latent's value: pass --sae DIR --latent I")
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be ≥ 0")
        check_device(self.device)


def _points(model, cfg: SteerConfig) -> list[str]:
    from analysis.directions import canonical_point
    return [canonical_point(model, x) for x in (cfg.layer or "6").split(",") if x.strip()]


def build_vector(lm, cfg: SteerConfig):
    """The SteeringVector (and SAE latent for clamp) the config asks for."""
    from analysis import directions as D
    from analysis.steer_files import load_safetensors
    model, tok = lm.model, lm.tokenizer
    latent = None
    if cfg.load:
        sv = load_safetensors(cfg.load)
        if cfg.layer:   # re-target a saved single direction
            vec = next(iter(sv.directions.values()))
            sv.directions = {p: vec for p in _points(model, cfg)}
        if sv.d_model != D._d_model(model):
            raise UserError(f"--load {cfg.load!r}: d_model {sv.d_model} does not match the model's {D._d_model(model)}")
        return sv, None
    points = _points(model, cfg)
    if cfg.sae:
        layers = points if cfg.layer else None
        sv = D.from_sae(model, cfg.sae, cfg.latent, layers)
        if cfg.op == "clamp":
            latent, _ = D.load_sae_latent(cfg.sae, cfg.latent)
        return sv, latent
    sources = [D.canonical_point(model, cfg.source_layer)] if cfg.source_layer else points
    parts = []
    for src in sources:
        inject = points if cfg.source_layer else [src]
        if cfg.pairs:
            parts.append(D.caa(model, tok, cfg.pairs, src, inject, read=cfg.read, method=cfg.method))
        else:
            parts.append(D.actadd(model, tok, [cfg.add] if cfg.add else [], [cfg.sub] if cfg.sub else [], src,
                                  inject, read=cfg.read))
    sv = parts[0]
    for extra in parts[1:]:
        sv.directions.update(extra.directions)
    sv.meta["source_point"] = cfg.source_layer and sources[0] or ",".join(sources)
    return sv, latent


def _norm_scales(lm, cfg: SteerConfig, points: list[str]) -> dict[str, float] | None:
    from analysis.steer_eval import read_neutral, store_norm, typical_norm
    if not cfg.coeff_relative:
        return None
    if cfg.norm_scale is not None:
        return {p: cfg.norm_scale for p in points}
    if cfg.store:
        return {p: store_norm(cfg.store, p) for p in points}
    texts = read_neutral(cfg.neutral_file)
    return {p: typical_norm(lm.model, lm.tokenizer, p, texts) for p in points}


def _side_by_side(left: str, right: str, width: int = 60) -> str:
    import textwrap
    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x:<{width}} │ {y}" for x, y in zip(a, b))


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(SteerConfig, argv, section="steer", prog="saeforge steer",
                          description="steering directions, steered generation, sweeps and llama.cpp export")
    from analysis.steer_apply import steer
    from analysis.steer_eval import encode, format_sweep, generate, read_neutral, sweep, target_ids
    from analysis.steer_files import llama_cpp_index, save_bin, save_gguf, save_npy, save_safetensors
    from collect.model import load_model

    sweep_vals = cfg.sweep
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    model, tok = lm.model, lm.tokenizer
    sv, latent = build_vector(lm, cfg)
    scales = _norm_scales(lm, cfg, sv.points)
    n_layers = model.config.num_hidden_layers
    sv.meta.update({"model": lm.spec, "model_hint": getattr(model.config, "model_type", ""), "d_model": sv.d_model,
                    "coeff": cfg.coeff, "coeff_relative": cfg.coeff_relative, "op": cfg.op,
                    "positions": cfg.positions, "norm_scale": scales, "weights_hash": lm.weights_hash})
    print(f"direction: {sv.meta.get('source')} read at {sv.meta.get('source_point')} → injected at "
          f"{', '.join(sv.points)}; |v| = {', '.join(f'{float(v.norm()):.2f}' for v in sv.directions.values())}")

    # what gets added, in absolute units, for the file exports
    eff = cfg.coeff
    if scales:
        p0 = sv.points[0]
        eff = cfg.coeff * scales[p0] / float(sv.directions[p0].norm())
        print(f"relative coefficient: {cfg.coeff} × norm {scales[p0]:.1f} at {p0} = {eff:.3f} × raw direction")
    for path, fn in ((cfg.save, None), (cfg.npy, save_npy), (cfg.bin, save_bin)):
        if path:
            out = save_safetensors(sv, path) if fn is None else fn(sv, path, eff if cfg.op == "add" else 1.0)
            print(f"wrote {out}")
    if cfg.gguf:
        out = save_gguf(sv, cfg.gguf, n_layers, eff if cfg.op == "add" else 1.0)
        slots = ", ".join(f"{p} → direction.{llama_cpp_index(p, n_layers)}" for p in sv.points)
        print(f"wrote {out} ({slots}; llama.cpp: --control-vector {out})")

    ids = encode(tok, cfg.prompt, cfg.chat)
    kw = dict(coeff=cfg.coeff, op=cfg.op, positions=cfg.positions, norm_scale=scales, latent=latent,
              skip_first=cfg.skip_first)
    base_cont = None
    if not cfg.no_generate and cfg.max_new_tokens > 0:
        base_cont = generate(model, tok, ids, cfg.max_new_tokens, cfg.seed, cfg.temperature)
        steered = generate(model, tok, ids, cfg.max_new_tokens, cfg.seed, cfg.temperature, ctx=steer(model, sv, **kw))
        print(f"\nprompt: {cfg.prompt!r}  (seed {cfg.seed}, temperature {cfg.temperature}, op {cfg.op}, "
              f"coeff {cfg.coeff}{' relative' if scales else ''}, positions {cfg.positions})")
        print(_side_by_side("BASE", "STEERED"))
        print(_side_by_side("-" * 60, "-" * 60))
        print(_side_by_side(tok.decode(base_cont, skip_special_tokens=True),
                            tok.decode(steered, skip_special_tokens=True)))
    if sweep_vals:
        targets = target_ids(tok, cfg.targets)
        if base_cont is None:
            base_cont = generate(model, tok, ids, min(cfg.max_new_tokens, 20) or 20, cfg.seed, 0.0)
        rows = sweep(model, tok, sv, sweep_vals, ids, targets, read_neutral(cfg.neutral_file), op=cfg.op,
                     positions=cfg.positions, norm_scale=scales, latent=latent, cont=base_cont, seed=cfg.seed,
                     skip_first=cfg.skip_first,
                     progress=lambda xs: progress(xs, desc="sweep", unit="coeff", quiet=cfg.quiet))
        print(f"\nsweep at {', '.join(sv.points)} (targets {[tok.decode([t]) for t in targets]}, Δ vs base over the "
              f"base continuation; random = Gaussian direction of equal norm, seed {cfg.seed})")
        print(format_sweep(rows, " (× norm)" if scales else ""))
    if cfg.save:
        Path(str(cfg.save) + ".config.json").write_text(json.dumps(config_dict(cfg), indent=2))
    return 0

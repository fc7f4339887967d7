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
from typing import TYPE_CHECKING, Any, Literal, Sequence, cast


from saeforge.config import config_dict, option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError
from saeforge.progress import progress
from collect.model import ModelDtype

if TYPE_CHECKING:
    from analysis.steer_sampling import Sampling

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
    # generation and evaluation; sampling defaults are llama.cpp's (common/common.h)
    prompt: str = option("I hate you because", "prompt to continue")
    chat: bool = option(False, "wrap the prompt in the model's chat template")
    max_new_tokens: int = option(40, "tokens to generate")
    seed: int = option(0, "sampling seed (same for base and steered)")
    temperature: float = option(0.8, "sampling temperature; 0 = greedy (llama.cpp: --temp 0.8)")
    top_k: int = option(40, "keep the k most likely tokens; 0 = off (llama.cpp: --top-k 40)")
    top_p: float = option(0.95, "nucleus sampling; 1 = off (llama.cpp: --top-p 0.95)")
    min_p: float = option(0.05, "drop tokens below min-p × the top probability; 0 = off "
                                                   "(llama.cpp: --min-p 0.05)")
    repeat_penalty: float = option(1.0, "divide the logits of recent tokens by this; 1 = off "
                                                           "(llama.cpp: --repeat-penalty 1.0)")
    repeat_last_n: int = option(64, "window of the repeat penalty, prompt included; -1 = all "
                                                       "(llama.cpp: --repeat-last-n 64)")
    backend: Literal["torch", "llama.cpp"] = option("torch", "torch, or llama.cpp: also generate in llama.cpp itself with "
                                                      "the exported control vector, side by side")
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
        self.sampling().validate()

    def sampling(self) -> "Sampling":
        from analysis.steer_sampling import Sampling
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                        self.repeat_last_n, self.seed)


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
        assert cfg.latent is not None   # validate() requires --latent with --sae
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
    from analysis.directions import SteeringVector
    from analysis.steer_apply import added_vectors, steer
    from analysis.steer_eval import encode, format_sweep, generate, read_neutral, sweep, target_ids
    from analysis.steer_files import llama_cpp_index, save_bin, save_gguf, save_npy, save_safetensors
    from collect.model import load_model

    sweep_vals = cfg.sweep
    sampling = cfg.sampling()
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    model, tok = lm.model, cast(Any, lm.tokenizer)
    sv, latent = build_vector(lm, cfg)
    scales = _norm_scales(lm, cfg, sv.points)
    n_layers, d_model = int(cast(Any, model).config.num_hidden_layers), sv.d_model
    lcm = None
    if cfg.backend == "llama.cpp" and not cfg.no_generate and cfg.max_new_tokens > 0:
        from analysis import steer_llamacpp
        steer_llamacpp.check_expressible(sv, cfg.op, cfg.positions, cfg.skip_first, n_layers)
        lcm = steer_llamacpp.open_model(cfg.model, cfg.device)
    sv.meta.update({"model": lm.spec, "model_hint": getattr(model.config, "model_type", ""), "d_model": d_model,
                    "coeff": cfg.coeff, "coeff_relative": cfg.coeff_relative, "op": cfg.op,
                    "positions": cfg.positions, "norm_scale": scales, "weights_hash": lm.weights_hash})
    print(f"direction: {sv.meta.get('source')} read at {sv.meta.get('source_point')} → injected at "
          f"{', '.join(sv.points)}; |v| = {', '.join(f'{float(v.norm()):.2f}' for v in sv.directions.values())}")

    # the file exports hold exactly what the steering hook adds (one function computes both)
    added = SteeringVector(added_vectors(sv, cfg.coeff, scales), sv.meta) if cfg.op == "add" else sv
    if scales:
        for p, v in sv.directions.items():
            c = float(added.directions[p].norm() / v.norm())
            print(f"relative coefficient at {p}: {cfg.coeff} × norm {scales[p]:.1f} = {c:.3f} × raw direction")
    for path, fn in ((cfg.save, None), (cfg.npy, save_npy), (cfg.bin, save_bin)):
        if path:
            out = save_safetensors(sv, path) if fn is None else fn(added, path)
            print(f"wrote {out}")
    if cfg.gguf:
        out = save_gguf(added, cfg.gguf, n_layers, n_embd=d_model)
        slots = ", ".join(f"{p} → direction.{llama_cpp_index(p, n_layers)}" for p in sv.points)
        print(f"wrote {out} ({slots}; llama.cpp: llama-completion -m MODEL.gguf -no-cnv --control-vector {out})")

    ids = encode(tok, cfg.prompt, cfg.chat)
    kw = dict(coeff=cfg.coeff, op=cfg.op, positions=cfg.positions, norm_scale=scales, latent=latent,
              skip_first=cfg.skip_first)
    base_cont = None
    if not cfg.no_generate and cfg.max_new_tokens > 0:
        base_cont = generate(model, tok, ids, cfg.max_new_tokens, sampling)
        steered = generate(model, tok, ids, cfg.max_new_tokens, sampling, ctx=steer(model, sv, **kw))
        print(f"\nprompt: {cfg.prompt!r}  ({sampling.describe()}; op {cfg.op}, "
              f"coeff {cfg.coeff}{' relative' if scales else ''}, positions {cfg.positions})")
        _print_pair("BASE", "STEERED", tok.decode(base_cont, skip_special_tokens=True),
                    tok.decode(steered, skip_special_tokens=True))
        if lcm is not None:
            _llama_cpp_side(lcm, cfg, added, n_layers, d_model, ids[0].tolist(), base_cont.tolist(),
                            steered.tolist(), tok.decode(steered, skip_special_tokens=True))
    if sweep_vals:
        targets = target_ids(tok, cfg.targets)
        if base_cont is None:
            from dataclasses import replace
            base_cont = generate(model, tok, ids, min(cfg.max_new_tokens, 20) or 20, replace(sampling, temperature=0))
        rows = sweep(model, tok, sv, sweep_vals, ids, targets, read_neutral(cfg.neutral_file), op=cfg.op,
                     positions=cfg.positions, norm_scale=scales, latent=latent, cont=base_cont, seed=cfg.seed,
                     skip_first=cfg.skip_first,
                     progress=lambda xs: progress(xs, desc="sweep", unit="coeff", quiet=cfg.quiet))
        print(f"\nsweep at {', '.join(sv.points)} (targets {[tok.decode([t]) for t in targets]}, Δ vs base over the "
              f"base continuation; random = Gaussian direction of equal norm, seed {cfg.seed})")
        print(format_sweep(rows, " (× norm)" if scales else ""))
    if cfg.save:
        Path(str(cfg.save) + ".config.json").write_text(json.dumps(config_dict(cfg), indent=2), encoding="utf-8")
    return 0


def _print_pair(left_title: str, right_title: str, left: str, right: str) -> None:
    print(_side_by_side(left_title, right_title))
    print(_side_by_side("-" * 60, "-" * 60))
    print(_side_by_side(left, right))


def _llama_cpp_side(lcm, cfg: SteerConfig, added, n_layers: int, d_model: int, torch_prompt: list[int],
                    torch_base: list[int], torch_steered: list[int], torch_text: str) -> None:
    """Generate in llama.cpp with the exported control vector; print it beside PyTorch's."""
    import tempfile

    from analysis import steer_llamacpp as LC
    from analysis.steer_files import save_gguf
    sampling = cfg.sampling()
    prompt = LC.prompt_tokens(lcm, cfg.prompt, cfg.chat)
    with tempfile.TemporaryDirectory() as tmp:
        path = cfg.gguf or str(Path(tmp) / "steer.gguf")
        if not cfg.gguf:
            save_gguf(added, path, n_layers, n_embd=d_model)
        base = LC.generate(lcm, prompt, cfg.max_new_tokens, sampling)
        steered = LC.generate(lcm, prompt, cfg.max_new_tokens, sampling, control_vector=path)
    print(f"\nllama.cpp ({lcm.arch}, {lcm.quantization}, {Path(lcm.path).name}; control vector "
          f"{cfg.gguf or 'exported to a temporary file'}; its tokenizer"
          f"{' and chat template' if cfg.chat else ''}; prompt tokens "
          f"{'identical to' if prompt == torch_prompt else 'DIFFERENT from'} PyTorch's)")
    _print_pair("STEERED (PyTorch)", "STEERED (llama.cpp)", torch_text, steered.text)
    if sampling.temperature <= 0 and prompt == torch_prompt:
        for name, a, b in (("base", torch_base, base), ("steered", torch_steered, steered)):
            a = LC.strip_eos(a, lcm)   # transformers keeps the EOS it stopped at; llama.cpp stops before it
            n = LC.agreement(a, b.tokens)
            if n == len(a) == len(b.tokens):
                where = " (all of them)" + (" and both stop at EOS" if n < cfg.max_new_tokens else "")
            else:
                where = f"; they part at token {n + 1}, where llama.cpp's top two logits are {b.margins[n]:.3f} apart"
            print(f"greedy {name}: llama.cpp and PyTorch agree on the first {n} of {max(len(a), len(b.tokens))} "
                  f"tokens{where}")

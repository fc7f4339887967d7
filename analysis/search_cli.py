"""`saeforge search --model M --sae SAE_DIR --latent I [--greedy-tokens 5] [--gradient]`
   `saeforge search --model M --hook layers.6.resid_post --neuron J`         (a residual basis direction)
   `saeforge search --model M --hook layers.6.mlp_hidden --neuron J`         (an MLP neuron)
   `saeforge search --model M --direction love.safetensors --gradient`      (a `saeforge steer --save` file)

Complete search over every token of the vocabulary (after an optional prefix, BOS by default), a
greedy left-to-right search and, with --gradient, gradient ascent on a soft input (the seed's softmax
prior and/or the plain embedding variant); prints what each finds with the activation its tokens really
produce, and where the three agree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from collect.model import load_model
from saeforge.config import config_dict, option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError


@dataclass
class SearchConfig:
    model: str | None = option(None, "model spec (none: the SAE's model, else smollm2-135m)")
    sae: str | None = option(None, "SAE directory (its hook point is searched)")
    latent: int | None = option(None, "SAE latent to maximise")
    hook: str | None = option(None, "read: a hook point, or layers.N.mlp_hidden for MLP neurons "
                                    "(for --neuron; picks the point of a --direction file with several)")
    neuron: int | None = option(None, "dimension of the read to maximise")
    direction: str | None = option(None, "steering-vector .safetensors (saeforge steer --save): maximise the "
                                         "projection on it")
    greedy_tokens: int = option(5, "length of the greedy search (0 = no greedy search)")
    top: int = option(10, "best single tokens listed")
    prefix: str = option("", "text placed before the searched tokens")
    bos: bool = option(True, "start the input with BOS (as the store's sequences do)")
    vocab: int | None = option(None, "search only token ids below this (none: all)")
    batch: int = option(512, "vocabulary tokens per forward")
    gradient: bool = option(False, "also run gradient search on a soft input")
    prior: Literal["softmax", "embed", "both"] = option(
        "softmax", "softmax: logits → softmax(·/τ) → embedding matrix (seed 004); embed: the embeddings themselves, "
                   "projected to the nearest token")
    grad_tokens: int | None = option(None, "positions optimised by gradient search (none: --greedy-tokens, or 5)")
    positions: Literal["last", "all"] = option("last", "maximise the feature at the last position or its mean "
                                                       "over the searched positions")
    steps: int = option(100, "gradient steps")
    restarts: int = option(8, "restarts optimised together in one batch")
    lr: float = option(0.3, "Adam step: logit units (softmax) or the embedding's RMS entry (embed)")
    temp_start: float = option(1.0, "softmax temperature at the first step")
    temp_end: float = option(0.05, "softmax temperature at the last step (geometric schedule)")
    init_scale: float = option(1.0, "std of the initial logits (softmax) / of the noise on the starting tokens (embed)")
    eval_every: int = option(10, "run each restart's discretised tokens every N steps and keep the best")
    seed: int = option(0, "seed of the restarts' initialisation")
    out: str | None = option(None, "also write the result as JSON here")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default; 1 is fastest on a busy machine)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        check_device(self.device)
        given = [self.sae is not None, self.direction is not None, self.neuron is not None]
        if sum(given) != 1:
            raise UserError("give one feature: --sae SAE_DIR --latent I, --hook H --neuron J, or --direction FILE")
        if self.sae is not None and self.latent is None:
            raise UserError("--latent is required with --sae (e.g. --latent 0)")
        if self.neuron is not None and self.hook is None:
            raise UserError("--neuron needs --hook (e.g. --hook layers.6.resid_post or layers.6.mlp_hidden)")
        if self.greedy_tokens < 0 or self.top < 1 or self.batch < 1:
            raise UserError("--greedy-tokens must be ≥ 0, --top and --batch ≥ 1")
        if self.gradient and (self.steps < 1 or self.restarts < 1 or (self.grad_tokens is not None and self.grad_tokens < 1)):
            raise UserError(f"--steps ({self.steps}), --restarts ({self.restarts}) and --grad-tokens must be ≥ 1")
        if self.gradient and not (self.lr > 0 and self.temp_start > 0 and self.temp_end > 0 and self.init_scale >= 0):
            raise UserError("--lr, --temp-start and --temp-end must be > 0 and --init-scale ≥ 0")
        if self.out is not None and Path(self.out).is_dir():
            raise UserError(f"--out {self.out!r} is a directory; pass a .json file path")


def _objective(cfg: SearchConfig, lm, meta, sae):
    from analysis.objectives import Objective, canonical_read, direction_objective, read_width
    if cfg.direction is not None:
        return direction_objective(cfg.direction, lm.model, cfg.hook)
    hook_name = (meta or {}).get("hook_point") or cfg.hook
    if hook_name is None:
        raise UserError(f"SAE {cfg.sae!r} names no hook point; pass --hook")
    hook = canonical_read(lm.model, hook_name)
    if sae is not None:
        return Objective.for_latent(sae, cfg.latent, hook)  # type: ignore[arg-type]
    return Objective.for_neuron(hook, cfg.neuron, read_width(lm.model, hook))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.vocab_search import complete_search, greedy_search, vocab_size
    from saeforge.urls import write_json

    cfg, _ = parse_config(SearchConfig, argv, section="search", prog="saeforge search",
                          description="Complete, greedy and gradient search for inputs that activate a feature.")
    if cfg.threads > 0:
        import torch
        torch.set_num_threads(cfg.threads)
    sae = meta = None
    if cfg.sae:
        from sae.io import load_sae, sae_summary
        meta = sae_summary(cfg.sae)
        if meta["d_sae"] is not None and not 0 <= cfg.latent < int(meta["d_sae"]):  # type: ignore[operator]
            raise UserError(f"--latent {cfg.latent} is out of range: SAE {cfg.sae!r} has {meta['d_sae']} latents "
                            f"(0..{int(meta['d_sae']) - 1})")
        if cfg.hook and meta["hook_point"] and cfg.hook != meta["hook_point"]:
            raise UserError(f"--hook {cfg.hook!r} differs from the SAE's hook point {meta['hook_point']!r}; drop --hook")
        sae = load_sae(cfg.sae, cfg.device)
    lm = load_model(cfg.model or (meta or {}).get("model") or "smollm2-135m", cfg.device)
    if meta and meta.get("model_hash") and meta["model_hash"] != lm.weights_hash:
        raise UserError(f"SAE {cfg.sae!r} was trained on model {meta.get('model')!r} (hash {meta['model_hash'][:12]}) "
                        f"but {lm.spec!r} has hash {lm.weights_hash[:12]}; pass the SAE's model with --model")
    obj = _objective(cfg, lm, meta, sae)
    n_vocab = vocab_size(lm.model, cfg.vocab)
    tok: Any = lm.tokenizer
    prefix = ([tok.bos_token_id] if cfg.bos and tok.bos_token_id is not None else [])
    prefix += tok(cfg.prefix, add_special_tokens=False)["input_ids"] if cfg.prefix else []
    kw: dict[str, Any] = dict(tokenizer=tok, vocab=cfg.vocab, batch=cfg.batch, quiet=cfg.quiet)
    comp = complete_search(lm.model, obj, prefix, top=cfg.top, **kw)
    print(f"{obj.name} · prefix {tok.decode(prefix)!r}")
    print(f"complete search over {n_vocab} tokens:")
    for c in comp.top:
        print(f"  {c.activation:>10.4f}  (pre {c.pre:>8.3f})  {c.text!r}  [{c.ids[0]}]")
    greedy = None
    if cfg.greedy_tokens:
        greedy = greedy_search(lm.model, obj, cfg.greedy_tokens, prefix, top=cfg.top, **kw)
        print(f"greedy search, {cfg.greedy_tokens} tokens (activation at the last token):")
        for c in greedy.steps:
            print(f"  {c.activation:>10.4f}  (pre {c.pre:>8.3f})  {c.text!r}  {c.ids}")
        b = greedy.best
        print(f"best: {b.text!r} → {b.activation:.4f}")
    doc = {"objective": obj.name, "prefix": prefix, "vocab": n_vocab, "complete": [asdict(c) for c in comp.top],
           "greedy": [asdict(c) for c in greedy.steps] if greedy else [], "gradient": [], "config": config_dict(cfg)}
    if cfg.gradient:
        doc["gradient"] = _gradient(cfg, lm, obj, prefix, comp, greedy)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.out, doc)
        print(f"wrote {cfg.out}")
    return 0


def _gradient(cfg: SearchConfig, lm, obj, prefix: list[int], comp, greedy) -> list[dict]:
    """Run gradient search with each asked prior; print its restarts and the agreement table."""
    from analysis.grad_search import agreement, gradient_search
    from analysis.vocab_search import activation_of, greedy_search
    n = cfg.grad_tokens or cfg.greedy_tokens or 5
    tok: Any = lm.tokenizer
    from_pos = None if cfg.positions == "last" else len(prefix)
    if greedy is None or len(greedy.steps) < n:
        greedy = greedy_search(lm.model, obj, n, prefix, tokenizer=tok, vocab=cfg.vocab, batch=cfg.batch,
                               quiet=cfg.quiet)
    g_ids = greedy.steps[n - 1].ids
    g_act = activation_of(lm.model, obj, prefix + g_ids, from_pos)[0]
    g_text = greedy.steps[n - 1].text
    readout = "at the last position" if cfg.positions == "last" else "mean over the searched positions"
    rows = [("complete (1 token)", f"{comp.top[0].text!r} {comp.top[0].ids}", comp.top[0].activation, "", "0"),
            (f"greedy ({n} tokens)", f"{g_text!r} {g_ids}", g_act, "",
             ",".join(str(int(comp.rank[t])) for t in g_ids))]
    out = []
    for prior in (("softmax", "embed") if cfg.prior == "both" else (cfg.prior,)):
        res = gradient_search(lm.model, obj, n, prefix, prior=prior, steps=cfg.steps, restarts=cfg.restarts,  # type: ignore[arg-type]
                              lr=cfg.lr, temp_start=cfg.temp_start, temp_end=cfg.temp_end, init_scale=cfg.init_scale,
                              positions=cfg.positions, vocab=cfg.vocab, seed=cfg.seed, eval_every=cfg.eval_every,  # type: ignore[arg-type]
                              tokenizer=tok, quiet=cfg.quiet)
        print(f"gradient search ({prior} prior, {n} tokens, {cfg.restarts} restarts, {cfg.steps} steps, {readout}, "
              f"{res.seconds:.1f} s): restart · tokens' activation · soft objective at the end / best · step found")
        for r_i, r in enumerate(sorted(res.runs, key=lambda r: (r.activation, r.pre), reverse=True)):
            print(f"  {r_i:>2}  {r.activation:>10.4f}  {r.soft:>10.4f} / {r.soft_max:<10.4f}  step {r.step:>4}  {r.text!r}  {r.ids}")
        ag = agreement(res.best, g_ids, g_act, comp.rank, comp.top[0].activation)
        rows.append((f"gradient {prior}", f"{res.best.text!r} {res.best.ids}", res.best.activation,
                     "same string" if ag.same_as_greedy else f"{ag.shared_with_greedy}/{len(set(g_ids))} tokens shared",
                     ",".join(map(str, ag.complete_ranks))))
        out.append({"prior": prior, "seconds": res.seconds, "runs": [asdict(r) for r in res.runs],
                    "best": asdict(res.best), "agreement": asdict(ag)})
    print(f"agreement (activation {readout}, each string run as tokens):")
    print(f"  {'method':<20} {'activation':>10}  {'vs greedy':<20} {'complete-search ranks':<22} text")
    for name, text, act, vs, ranks in rows:
        print(f"  {name:<20} {act:>10.4f}  {vs:<20} {ranks:<22} {text}")
    return out

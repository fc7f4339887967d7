"""`saeforge search --model M --sae SAE_DIR --latent I [--greedy-tokens 5]`
   `saeforge search --model M --hook layers.6.resid_post --neuron J`

Complete search over every token of the vocabulary (after an optional prefix, BOS by default),
then a greedy left-to-right search; prints the strings with their activations.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from saeforge.config import config_dict, option, parse_config
from saeforge.errors import UserError
from collect.model import load_model


@dataclass
class SearchConfig:
    model: str | None = option(None, "model spec (default: the SAE's model, else smollm2-135m)")
    sae: str | None = option(None, "SAE directory (its hook point is searched)")
    latent: int | None = option(None, "SAE latent to maximise")
    hook: str | None = option(None, "hook point, for --neuron without an SAE")
    neuron: int | None = option(None, "dimension of the hook point to maximise")
    greedy_tokens: int = option(5, "length of the greedy search (0 = complete search only)")
    top: int = option(10, "best single tokens listed")
    prefix: str = option("", "text placed before the searched tokens")
    bos: bool = option(True, "start the input with BOS (as the store's sequences do)")
    vocab: int | None = option(None, "search only token ids below this (default: all)")
    batch: int = option(512, "vocabulary tokens per forward")
    out: str | None = option(None, "also write the result as JSON here")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if self.sae is None and (self.hook is None or self.neuron is None):
            raise UserError("give --sae SAE_DIR --latent I, or --hook H --neuron J")
        if self.sae is not None and self.latent is None:
            raise UserError("--latent is required with --sae (e.g. --latent 0)")
        if self.greedy_tokens < 0 or self.top < 1 or self.batch < 1:
            raise UserError("--greedy-tokens must be ≥ 0, --top and --batch ≥ 1")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.vocab_search import Objective, complete_search, greedy_search
    from collect.layers import discover_layout, resolve_hook_point

    cfg, _ = parse_config(SearchConfig, argv, section="search", prog="saeforge search",
                          description="Complete and greedy vocabulary search for inputs that activate a latent or neuron.")
    sae = meta = None
    if cfg.sae:
        from sae.io import sae_summary
        from sae.io import load_sae
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
    layout = discover_layout(lm.model)
    hook_name = (meta or {}).get("hook_point") or cfg.hook
    if hook_name is None:
        raise UserError(f"SAE {cfg.sae!r} names no hook point; pass --hook")
    hook = resolve_hook_point(layout, hook_name).name
    d_model = int(lm.model.get_input_embeddings().weight.shape[1])
    obj = Objective.for_latent(sae, cfg.latent, hook) if sae is not None else Objective.for_neuron(hook, cfg.neuron, d_model)  # type: ignore[arg-type]
    tok = lm.tokenizer
    prefix = ([tok.bos_token_id] if cfg.bos and tok.bos_token_id is not None else [])
    prefix += tok(cfg.prefix, add_special_tokens=False)["input_ids"] if cfg.prefix else []
    kw = dict(tokenizer=tok, vocab=cfg.vocab, batch=cfg.batch, quiet=cfg.quiet)
    comp = complete_search(lm.model, obj, prefix, top=cfg.top, **kw)
    print(f"{obj.name} · prefix {tok.decode(prefix)!r}")
    print(f"complete search over {cfg.vocab or int(lm.model.get_input_embeddings().weight.shape[0])} tokens:")
    for c in comp.top:
        print(f"  {c.activation:>10.4f}  (pre {c.pre:>8.3f})  {c.text!r}  [{c.ids[0]}]")
    greedy = None
    if cfg.greedy_tokens:
        greedy = greedy_search(lm.model, obj, cfg.greedy_tokens, prefix, top=cfg.top, **kw)
        print(f"greedy search, {cfg.greedy_tokens} tokens (activation at the last token):")
        for c in greedy.steps:
            print(f"  {c.activation:>10.4f}  (pre {c.pre:>8.3f})  {c.text!r}")
        b = greedy.best
        print(f"best: {b.text!r} → {b.activation:.4f}")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"objective": obj.name, "prefix": prefix, "complete": [asdict(c) for c in comp.top],
               "greedy": [asdict(c) for c in greedy.steps] if greedy else [], "config": config_dict(cfg)}
        Path(cfg.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        print(f"wrote {cfg.out}")
    return 0

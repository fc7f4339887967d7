"""`saeforge explain FEATURES_DIR [--explainer smollm2-135m|URL] [--scorer …] [--limit N]`

One sentence per latent from an explainer LM, scored by detection (balanced accuracy) beside the
token-list label; batched, resumable (finished latents are kept in DIR/explanations.jsonl), shown
in the viewer (data/explanations.js) and written to DIR/explanations.json."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saeforge.config import option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError


@dataclass
class ExplainConfig:
    dir: str = option("", "output directory of `saeforge features`", positional=True)
    explainer: str = option("smollm2-135m", "model spec (alias, HF dir, .gguf, hub name) or an OpenAI-compatible "
                                            "endpoint URL (http://host:port/v1)")
    scorer: str | None = option(None, "model spec or endpoint URL of the detection scorer (default: the explainer)")
    api_model: str = option("default", "model name sent to an endpoint")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the endpoint's key")
    latents: list[int] = option([], "latents to explain (default: every latent that fired)")
    limit: int = option(0, "explain only the first N of them (0: all)")
    n_shown: int = option(10, "top examples the explainer sees")
    n_test: int = option(8, "held-out activating excerpts per latent (and as many non-activating)")
    batch_size: int = option(4, "latents per batch (a local model runs a batch's prompts together)")
    max_new_tokens: int = option(40, "tokens of each explanation")
    device: str = option("cpu", "cpu, cuda or cuda:N for a local model")
    seed: int = option(0, "seed of the non-activating contexts")
    overwrite: bool = option(False, "discard earlier results instead of resuming")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if not self.dir:
            raise UserError("give the features directory: saeforge explain DIR")
        for name in ("n_shown", "n_test", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.limit < 0:
            raise UserError(f"--limit {self.limit} must be ≥ 0 (0 = all)")
        check_device(self.device)


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.explain import ExplainSettings, explain_latents, summary
    from analysis.explain_clients import make_client
    from analysis.features_io import load_features

    cfg, _ = parse_config(ExplainConfig, argv, section="explain", prog="saeforge explain",
                          description="Explain latents with an LM and score explanations and labels by detection.")
    load_features(cfg.dir)
    loaded: dict = {}
    explainer = make_client(cfg.explainer, cfg.device, cfg.api_model, cfg.api_key_env, 4 * cfg.batch_size, loaded)
    scorer_spec = cfg.scorer or cfg.explainer
    scorer = make_client(scorer_spec, cfg.device, cfg.api_model, cfg.api_key_env, 4 * cfg.batch_size, loaded)
    settings = ExplainSettings(explainer=explainer.name, scorer=scorer.name, n_shown=cfg.n_shown, n_test=cfg.n_test,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    done = explain_latents(cfg.dir, explainer, scorer, settings, cfg.latents or None, cfg.limit, cfg.batch_size,
                           cfg.overwrite, device=cfg.device, quiet=cfg.quiet)
    s = summary(done)
    print(f"{len(done)} latents explained in {cfg.dir}/explanations.json (explainer {explainer.name}, scorer {scorer.name})")
    if s["n"]:
        print(f"detection score (balanced accuracy, {s['n']} latents): LLM explanation {s['score']:.3f} "
              f"(AUROC {s['auroc']:.3f}) vs token-list label {s['label_score']:.3f} (AUROC {s['label_auroc']:.3f}); "
              f"explanation better on {s['explanation_better']}, label better on {s['label_better']}")
    return 0

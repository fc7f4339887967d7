"""`saeforge align SAE_A SAE_B [--threshold 0.7]`: match latents by decoder cosine similarity."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from saeforge.config import config_dict, option, parse_config
from saeforge.errors import UserError
from saeforge.urls import write_json


@dataclass
class AlignConfig:
    sae_a: str = option("", "first SAE directory", positional=True)
    sae_b: str = option("", "second SAE directory", positional=True)
    threshold: float = option(0.7, "cosine above which a latent counts as matched")
    one_to_one: Literal["auto", "hungarian", "greedy"] = option("auto", "auto (Hungarian with scipy when small), hungarian or greedy")
    out: str | None = option(None, "write matches as JSON here")
    show: int = option(10, "matched pairs printed")

    def validate(self) -> None:
        if not self.sae_a or not self.sae_b:
            raise UserError("give two SAE directories: saeforge align SAE_A SAE_B")
        if not -1 <= self.threshold <= 1:
            raise UserError(f"--threshold {self.threshold} must be a cosine in [-1, 1]")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.align import align
    from sae.io import sae_summary
    from sae.io import load_sae

    cfg, _ = parse_config(AlignConfig, argv, section="align",
                          prog="saeforge align", description="Match the latents of two SAEs by decoder cosine.")
    ma, mb = sae_summary(cfg.sae_a), sae_summary(cfg.sae_b)
    a, b = load_sae(cfg.sae_a), load_sae(cfg.sae_b)
    res = align(a.W_dec, b.W_dec, cfg.threshold, one_to_one=cfg.one_to_one)
    na, nb = res.best_b.numel(), res.best_a.numel()
    print(f"A: {cfg.sae_a} ({na} latents, {ma['hook_point']})   B: {cfg.sae_b} ({nb} latents, {mb['hook_point']})")
    if ma.get("model_hash") != mb.get("model_hash"):
        print("note: the SAEs come from different models")
    print(f"share of A latents with a B partner at cosine ≥ {cfg.threshold}: {res.share:.3f}")
    print(f"share of B latents with an A partner:                       {res.share_b:.3f}")
    print(f"mutual nearest neighbours above threshold:                  {res.mutual:.3f}")
    print(f"one-to-one ({res.method}) matched above threshold:          {res.share_one_to_one:.3f}")
    print(f"median best-match cosine: {float(res.best_cos.median()):.3f}")
    order = res.best_cos.argsort(descending=True)[:cfg.show].tolist()
    for i in order:
        print(f"  A {i:>6} ↔ B {int(res.best_b[i]):>6}   cos {float(res.best_cos[i]):.3f}")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.out, {
            "sae_a": cfg.sae_a, "sae_b": cfg.sae_b, "threshold": cfg.threshold, "share": res.share,
            "share_b": res.share_b, "mutual": res.mutual, "share_one_to_one": res.share_one_to_one,
            "method": res.method, "best_b": res.best_b.tolist(), "best_cos": [round(v, 5) for v in res.best_cos.tolist()],
            "match_b": res.match_b.tolist(), "match_cos": [round(v, 5) for v in res.match_cos.tolist()],
            "config": config_dict(cfg)})
        print(f"wrote {cfg.out}")
    return 0

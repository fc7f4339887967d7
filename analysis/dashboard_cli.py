"""`saeforge dashboard DIR`: re-render the HTML dashboard from DIR/features.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from saeforge.config import parse_config
from saeforge.errors import UserError


@dataclass
class DashboardConfig:
    dir: str | None = field(default=None, metadata={"help": "output directory of `saeforge features`"})
    latents: list[int] | None = field(default=None, metadata={"help": "only these latent pages (comma-separated)"})
    quiet: bool = False

    def validate(self) -> None:
        if not self.dir:
            raise UserError("give the features directory: saeforge dashboard DIR")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import render_dashboard
    from analysis.features import load_features
    from analysis.features_cli import split_positionals

    cfg, _ = parse_config(DashboardConfig, split_positionals(argv, ["dir"]), section="dashboard",
                          prog="saeforge dashboard", description="Render DIR/index.html and one page per latent.")
    n = len(load_features(cfg.dir)["latents"])
    for i in cfg.latents or []:
        if not 0 <= i < n:
            raise UserError(f"--latents: latent {i} is out of range (this SAE has {n} latents: 0..{n - 1})")
    path = render_dashboard(cfg.dir, cfg.latents, quiet=cfg.quiet)  # type: ignore[arg-type]
    print(f"wrote {path}")
    return 0

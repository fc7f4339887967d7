"""`saeforge dashboard DIR`: re-render the HTML dashboard from DIR/features.json."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saeforge.config import option, parse_config
from saeforge.errors import UserError


@dataclass
class DashboardConfig:
    dir: str = option("", "output directory of `saeforge features`", positional=True)
    latents: list[int] | None = option(None, "only these latent pages (comma-separated)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if not self.dir:
            raise UserError("give the features directory: saeforge dashboard DIR")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import render_dashboard
    from analysis.features import load_features

    cfg, _ = parse_config(DashboardConfig, argv, section="dashboard",
                          prog="saeforge dashboard", description="Render DIR/index.html and one page per latent.")
    n = len(load_features(cfg.dir)["latents"])
    for i in cfg.latents or []:
        if not 0 <= i < n:
            raise UserError(f"--latents: latent {i} is out of range (this SAE has {n} latents: 0..{n - 1})")
    path = render_dashboard(cfg.dir, cfg.latents, quiet=cfg.quiet)
    print(f"wrote {path}")
    return 0

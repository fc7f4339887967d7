"""`saeforge dashboard DIR`: re-render the viewer of a features directory from its data.

Copies the current viewer (index.html, viewer.js, viewer.css) into DIR and rewrites
data/explanations.js from DIR/explanations.json when `saeforge explain` has written one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saeforge.config import option, parse_config
from saeforge.errors import UserError


@dataclass
class DashboardConfig:
    dir: str = option("", "output directory of `saeforge features`", positional=True)
    quiet: bool = option(False, "print nothing but errors")

    def validate(self) -> None:
        if not self.dir:
            raise UserError("give the features directory: saeforge dashboard DIR")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import install_viewer, refresh_explanations

    cfg, _ = parse_config(DashboardConfig, argv, section="dashboard", prog="saeforge dashboard",
                          description="Re-render the static viewer of a features directory from its data.")
    path = install_viewer(cfg.dir)
    n = refresh_explanations(cfg.dir)
    if not cfg.quiet:
        print(f"wrote {path}" + (f" ({n} explained latents)" if n else ""))
    return 0

"""`saeforge export SAE_DIR --format saelens --out DIR`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from saeforge.config import option, parse_config
from saeforge.errors import UserError


@dataclass
class ExportConfig:
    sae: str = option("", "SAE directory written by `saeforge train` (path or fsspec URL)", positional=True)
    format: Literal["saelens"] = option("saelens", "target library's format")
    out: str = option("", "output folder")

    def validate(self) -> None:
        if not self.sae:
            raise UserError("give the SAE directory: saeforge export SAE_DIR --out DIR")
        if not self.out:
            raise UserError("--out is required: the folder to write the export to")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(ExportConfig, argv, section="export", prog="saeforge export",
                          description="export a trained SAE to another library's format")
    from sae.export_saelens import export_saelens
    out = export_saelens(cfg.sae, cfg.out)
    print(f"wrote {out} (load with sae_lens.SAE.load_from_disk({str(out)!r}))")
    return 0

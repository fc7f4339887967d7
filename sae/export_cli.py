"""`saeforge export SAE_DIR --format saelens --out DIR`."""
from __future__ import annotations

import argparse
from typing import Sequence

from saeforge.errors import UserError

FORMATS = ("saelens",)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="saeforge export", description="export a trained SAE to another library's format")
    p.add_argument("sae_dir", help="SAE directory written by `saeforge train`")
    p.add_argument("--format", default="saelens", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(argv)
    if a.format not in FORMATS:
        raise UserError(f"--format {a.format!r} is not supported; use one of {', '.join(FORMATS)}")
    from sae.export_saelens import export_saelens
    out = export_saelens(a.sae_dir, a.out)
    print(f"wrote {out} (load with sae_lens.SAE.load_from_disk({str(out)!r}))")
    return 0

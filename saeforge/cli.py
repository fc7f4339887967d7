"""The `saeforge` console script: dispatches a subcommand to the module that owns it.

Modules are imported lazily by name so `collect` never imports `sae` or `analysis` at load time
(imports flow collect <- sae <- analysis). Each target module has `main(argv) -> int`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from saeforge.errors import run_cli

COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("collect.collect_cli", "collect activations into a Zarr store"),
    "train": ("sae.train_cli", "train sparse autoencoders on a store"),
    "eval": ("sae.eval_cli", "evaluate an SAE (reconstruction, sparsity, CE loss recovered)"),
    "export": ("sae.export_cli", "export an SAE (e.g. --format saelens)"),
    "features": ("analysis.features_cli", "feature statistics, labels and the static viewer"),
    "dashboard": ("analysis.dashboard_cli", "re-render the viewer of a features directory from its data"),
    "serve": ("analysis.serve_cli", "serve the viewer with live endpoints (tokens → latents, steering)"),
    "explain": ("analysis.explain_cli", "explain latents with an LM and score the explanations (detection)"),
    "search": ("analysis.search_cli", "complete, greedy and gradient search for inputs that activate a feature"),
    "align": ("analysis.align_cli", "match latents of two SAEs by decoder cosine"),
    "align-layers": ("analysis.align_layers_cli", "overlap of features' top inputs across layers, vs a random init"),
    "steer": ("analysis.steer_cli", "steering directions and steered generation"),
    "lens": ("analysis.lens_cli", "logit lens over layers"),
    "patch": ("analysis.patch_cli", "activation patching"),
    "compare-backends": ("analysis.compare_backends_cli", "llama.cpp's layer outputs vs the PyTorch model's"),
}


def usage(package: str | None = None) -> str:
    rows = [f"  {name:<13} {desc}" for name, (mod, desc) in COMMANDS.items()
            if package is None or mod.startswith(package + ".")]
    return "usage: saeforge COMMAND [args]\n\ncommands:\n" + "\n".join(rows)


def dispatch(argv: Sequence[str] | None = None, package: str | None = None) -> int:
    """Run `COMMAND args…`; `package` limits the commands (for `python -m collect|sae|analysis`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(package))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS or (package and not COMMANDS[name][0].startswith(package + ".")):
        print(f"error: unknown command {name!r}\n{usage(package)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_cli(module.main, rest)


def main() -> None:
    sys.exit(dispatch())

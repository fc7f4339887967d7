"""Shared infrastructure of saeforge: the console script, typed configs, one-line user errors,
progress bars, the fsspec path layer and torchrun's environment.

Layering: `saeforge` (this package) ← `collect` ← `sae` ← `analysis`. Nothing here imports the
stage packages at load time; the console-script dispatcher imports each command's module by name.
"""
from saeforge.errors import UserError
from saeforge.progress import progress

__version__ = "0.2.0"
__all__ = ["UserError", "progress", "__version__"]

"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A mistake the user can fix: the message names the bad value and the fix."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point; turn UserError into one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

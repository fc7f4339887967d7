"""One way to show progress: a tqdm bar with a rate, silenced by `quiet`."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", quiet: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar (dynamic width, SI-scaled rate) that is disabled when quiet."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=quiet, **kw)

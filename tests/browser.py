"""Headless Chromium through Playwright for Python, on Debian's /usr/bin/chromium (never a downloaded
browser), plus a page that records console errors, uncaught exceptions and dialogs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see .ci/run)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    """A page and what went wrong on it: console errors, page errors and every dialog (dismissed)."""
    page: Any
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def watched_page(browser: Any, width: int = 1280, height: int = 900) -> Watched:
    page = browser.new_page(viewport={"width": width, "height": height})
    w = Watched(page)
    page.on("console", lambda m: w.errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "assert") else None)
    page.on("pageerror", lambda e: w.errors.append(f"page error: {e}"))

    def dialog(d: Any) -> None:
        w.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()
    page.on("dialog", dialog)
    return w


def pixels(png: bytes) -> np.ndarray:
    """A screenshot as an RGB array [h, w, 3]."""
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def colour_fraction(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> float:
    """Share of pixels within `tol` (per channel) of a colour."""
    return float((np.abs(img - np.array(rgb)).max(axis=2) <= tol).mean())

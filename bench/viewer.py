"""Viewer targets, measured: bytes on disk per latent, the index of a 65,536-latent SAE interactive in
headless Chromium (sort, filter, search by label and by token), and a latent view rendered.

    python bench/viewer.py --features runs/quickstart/features [--latents 65536] [--reps 20]

With --features (the output of `saeforge features`) it reports that directory's bytes per latent,
then writes a synthetic 65,536-latent directory through the same writer, with contexts cut from the
store that directory was made from (real text) and its vocabulary, and drives it in Chromium
(Playwright on Debian's /usr/bin/chromium). Without --features the contexts come from random token
ids over a 49,152-token vocabulary (text that compresses worse than real text).
Each figure is printed beside its target as a ratio (measured / target: below 1 meets it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.dashboard import install_viewer  # noqa: E402
from analysis.features_io import load_features, load_vocab, write_features  # noqa: E402
from analysis.features_synthetic import synthetic_logits, synthetic_stats  # noqa: E402

TARGET_BYTES, TARGET_INDEX_MS, TARGET_LATENT_MS = 4096, 1000.0, 200.0
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PAINT = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
# type into a search box and wait until the count of shown latents has changed
TYPE = ("const s = document.getElementById('shown'), before = s.textContent, q = document.getElementById('{box}'); "
        "q.value = '{text}'; q.dispatchEvent(new Event('input')); "
        "await new Promise(res => {{ const t = setInterval(() => {{ if (s.textContent !== before) "
        "{{ clearInterval(t); res(); }} }}, 1); }})")


def dir_bytes(d: Path) -> tuple[int, int, int]:
    """(apparent bytes of everything, of the vocabulary file, allocated bytes on disk)."""
    files = [f for f in d.rglob("*") if f.is_file()]
    apparent = sum(f.stat().st_size for f in files)
    blocks = sum(f.stat().st_blocks * 512 for f in files)
    vocab = (d / "data" / "vocab.js").stat().st_size if (d / "data" / "vocab.js").is_file() else 0
    return apparent, vocab, blocks


def size_report(name: str, d: Path, n: int) -> None:
    apparent, vocab, blocks = dir_bytes(d)
    per = apparent / n
    print(f"{name}: {n:,} latents, {apparent / 1e6:.1f} MB ({blocks / 1e6:.1f} MB allocated): "
          f"{per:,.0f} B per latent, {(apparent - vocab) / n:,.0f} B without the vocabulary file "
          f"→ {per / TARGET_BYTES:.2f} of the 4 KB target")


def synthetic_dir(out: Path, n: int, features: Path | None, seed: int) -> Path:
    if features is not None:
        from collect.store import Store
        doc = load_features(features)
        vocab = load_vocab(features)
        store = Store.open(doc["store"]["path"])
        tokens = store.tokens(0, min(store.n_tokens, 2_000_000)).astype(np.int64)
        window, top = int(doc["layout"]["window"]), int(doc["layout"]["top"])
    else:
        vocab = [f"w{i}" for i in range(49152)]
        tokens = np.random.default_rng(seed).integers(0, len(vocab), 500_000)
        window, top = 10, 20
    t0 = time.perf_counter()
    st = synthetic_stats(n, tokens, top=top, samples=16, window=window, seed=seed)
    t1 = time.perf_counter()
    write_features(out, st, vocab, synthetic_logits(n, len(vocab), seed=seed),
                   {"sae": {"hook_point": "synthetic", "architecture": "topk"}, "model": "synthetic",
                    "store": {"path": "synthetic", "split": "all", "rows_counted": len(tokens)}})
    install_viewer(out)
    print(f"synthetic {n:,}-latent directory: statistics {t1 - t0:.1f} s, written in {time.perf_counter() - t1:.1f} s")
    return out


def measure(page, js: str) -> float:
    return float(page.evaluate(f"async () => {{ const t0 = performance.now(); {js}; await {PAINT}; "
                               f"return performance.now() - t0; }}"))


def browser_report(d: Path, n: int, reps: int, seed: int) -> None:
    from playwright.sync_api import sync_playwright
    rng = np.random.default_rng(seed)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        loads, parsed, sorts, filters, searches, toks, vocab_at, latents, cold = [], [], [], [], [], [], [], [], []
        url = (d / "index.html").as_uri()
        for r in range(3):
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function("() => window.saeforge && window.saeforge.ready", timeout=60000)
            page.evaluate(f"async () => {{ await {PAINT}; }}")
            loads.append(page.evaluate("saeforge.timings.readyAt"))
            parsed.append(page.evaluate("saeforge.timings.indexLoadedAt"))
            sorts.append(measure(page, "document.querySelector('#head span[data-key=max]').click()"))
            sorts.append(measure(page, "document.querySelector('#head span[data-key=density]').click()"))
            filters.append(measure(page, "document.getElementById('alive').click()"))
            searches.append(measure(page, TYPE.format(box="q", text="the")))
            page.wait_for_function("() => saeforge.timings.vocabAt !== undefined", timeout=60000)
            vocab_at.append(page.evaluate("saeforge.timings.vocabAt"))
            page.evaluate("const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input'))")
            toks.append(measure(page, TYPE.format(box="tok", text="the")))
            for i in rng.integers(0, n, max(1, reps // 3)).tolist():
                page.evaluate(f"location.hash = '#/latent/{i}'")
                page.wait_for_function(f"() => saeforge.timings.latentIndex === {i} && saeforge.timings.latent !== null")
                page.evaluate(f"async () => {{ await {PAINT}; }}")
                latents.append(page.evaluate("saeforge.timings.latent"))
            page.close()
            page = b.new_page(viewport={"width": 1280, "height": 900})
            i = int(rng.integers(0, n))
            page.goto(url + f"#/latent/{i}")
            page.wait_for_function(f"() => window.saeforge && saeforge.timings.latentIndex === {i} "
                                   f"&& saeforge.timings.latent !== null", timeout=60000)
            cold.append(page.evaluate(f"async () => {{ await {PAINT}; return performance.now(); }}"))
            page.close()
        b.close()
    med = statistics.median
    print(f"index of {n:,} latents (median of 3 page loads; in-page clock, painted):")
    print(f"  ready {med(loads):.0f} ms after navigation (index data loaded and parsed at {med(parsed):.0f} ms) "
          f"→ {med(loads) / TARGET_INDEX_MS:.2f} of the 1 s target")
    for name, xs in (("sort (click a column)", sorts), ("filter (fired only)", filters),
                     ("search by label (typed)", searches),
                     ("search by token (typed)", toks)):
        print(f"  {name}: {med(xs):.0f} ms (max {max(xs):.0f}); ready + this = {(med(loads) + med(xs)) / TARGET_INDEX_MS:.2f} "
              f"of the 1 s target")
    print(f"  vocabulary (for token search) loaded {med(vocab_at):.0f} ms after navigation")
    print(f"latent view, {len(latents)} random latents after the index (shard load + decode + render, painted): "
          f"median {med(latents):.0f} ms, max {max(latents):.0f} → {med(latents) / TARGET_LATENT_MS:.2f} of the 200 ms target")
    print(f"latent view opened directly (index.html#/latent/N, from navigation): median {med(cold):.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, help="a `saeforge features` output directory")
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=30, help="random latent views to time")
    ap.add_argument("--keep", type=Path, help="write the synthetic directory here (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.features is not None:
        doc = load_features(a.features)
        size_report(f"{a.features}", a.features, int(doc["layout"]["n_latents"]))
    with tempfile.TemporaryDirectory() as tmp:
        out = a.keep or Path(tmp) / "viewer65k"
        synthetic_dir(out, a.latents, a.features, a.seed)
        size_report(f"synthetic ({'real contexts' if a.features else 'random tokens'})", out, a.latents)
        browser_report(out, a.latents, a.reps, a.seed)


if __name__ == "__main__":
    main()

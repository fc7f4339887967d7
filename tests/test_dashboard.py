"""The static viewer in a real headless Chromium (Playwright): the index sorts, filters and searches
(also at 65,536 latents), a latent view shows exactly the data Python reads back, contexts read like
text, corpus markup stays text and never runs, and screenshots hold what they should."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.features_io import Reader, load_index
from tests.browser import browser, colour_fraction, pixels, watched_page  # noqa: F401 - fixture
from tests.test_dashboard_data import VOCAB, XSS, fake_features

MARK = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def shown_text(tokens: list[str]) -> str:
    """What a context must read as: spaces kept, newlines/tabs marked, edge whitespace marked."""
    text = "".join(tokens)
    lead = len(text) - len(text.lstrip())
    trail = len(text.rstrip())
    out = []
    for j, c in enumerate(text):
        edge = j < lead or j >= trail
        out.append(MARK.get(c, "␣" if edge and c == " " else c))
    return "".join(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viewer")
    fake_features(out)
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """65,536 synthetic latents written through the real writer (contexts from the synthetic vocabulary)."""
    from analysis.dashboard import install_viewer
    from analysis.features_io import write_features
    from analysis.features_synthetic import synthetic_logits, synthetic_stats
    out = tmp_path_factory.mktemp("viewer65k")
    rng = np.random.default_rng(0)
    st = synthetic_stats(65536, rng.integers(0, len(VOCAB), 20000), top=20, samples=12)
    write_features(out, st, VOCAB, synthetic_logits(65536, len(VOCAB)), {"sae": {"hook_point": "synthetic"},
                   "model": "synthetic"}, shard_size=512)
    install_viewer(out)
    return out


def open_viewer(browser, d: Path, hash_: str = ""):  # noqa: F811
    w = watched_page(browser)
    w.page.goto((d / "index.html").as_uri() + hash_)
    w.page.wait_for_function("() => window.saeforge && window.saeforge.ready", timeout=30000)
    return w


def rows(page) -> list[dict]:
    return page.evaluate("""Array.from(document.querySelectorAll('#rows .row')).map(r => ({
        index: +r.dataset.index, label: r.children[1].querySelector('a').textContent,
        cells: Array.from(r.children).map(c => c.textContent)}))""")


def wait_shown(page, n: int, total: int) -> None:
    """Wait until the (debounced) filter shows `n` of `total` latents."""
    page.wait_for_function(f"() => document.getElementById('shown').textContent === '{n:,} of {total:,} latents'")


def test_index_sorts_filters_and_searches(browser, small):  # noqa: F811
    idx = load_index(small)["columns"]
    w = open_viewer(browser, small)
    p = w.page
    assert p.text_content("#shown") == "40 latents · 3 never fired"
    assert [r["index"] for r in rows(p)][:10] == list(range(10))
    p.click("#head span[data-key=max]")
    want = sorted(range(40), key=lambda i: (-idx["max"][i], i))
    assert [r["index"] for r in rows(p)] == want[:len(rows(p))]
    assert p.get_attribute("#head span[data-key=max]", "aria-sort") == "descending"
    p.click("#head span[data-key=max]")
    assert [r["index"] for r in rows(p)][:5] == sorted(range(40), key=lambda i: (idx["max"][i], i))[:5]
    p.click("#head span[data-key=label]")
    got = [r["label"].lower() for r in rows(p)]
    assert got == sorted(got)
    p.check("#alive")
    assert p.text_content("#shown").startswith("37 of 40")
    assert all(idx["count"][r["index"]] > 0 for r in rows(p))
    p.uncheck("#alive")
    want_q = [i for i in range(40) if "tok7" in idx["label"][i].lower()]
    p.fill("#q", "TOK7")
    wait_shown(p, len(want_q), 40)
    assert want_q and sorted(r["index"] for r in rows(p)) == want_q
    p.fill("#q", "")
    p.fill("#tok", "THE")  # token search: " the" (id 50) among a latent's most frequent max-activating tokens
    the = VOCAB.index(" the")
    want_t = [i for i in range(40) if the in idx["top_tokens"][3 * i:3 * i + 3]]
    wait_shown(p, len(want_t), 40)
    assert sorted(r["index"] for r in rows(p)) == want_t
    p.fill("#tok", "")
    p.fill("#dmin", "0.1")
    wait_shown(p, sum(d >= 0.1 for d in idx["density"]), 40)
    assert rows(p) and all(idx["density"][r["index"]] >= 0.1 for r in rows(p))
    assert w.errors == [] and w.dialogs == []


def test_latent_view_shows_the_data_as_text(browser, small):  # noqa: F811
    reader = Reader(small)
    idx = load_index(small)["columns"]
    i = max(range(40), key=lambda j: idx["count"][j])
    rec = reader.latent(i)
    w = open_viewer(browser, small, f"#/latent/{i}")
    p = w.page
    p.wait_for_function(f"() => saeforge.timings.latent !== null && saeforge.timings.latentIndex === {i}")
    assert p.text_content("h1") == f"Latent {i}: {idx['label'][i]}"
    ex = p.evaluate("""Array.from(document.querySelectorAll('#latent-view .ex')).map(e => ({
        text: Array.from(e.childNodes).slice(1).map(n => n.textContent).join(''),
        max: e.querySelector('.t.max') ? e.querySelector('.t.max').title : null,
        shaded: e.querySelectorAll('.t').length}))""")
    acts = rec["activations"]
    assert len(ex) == len(acts) > 8
    for e, a in zip(ex, acts):
        assert e["text"] == shown_text(a["tokens"])  # the context reads as the tokens' text
        v = a["values"][a["maxValueTokenIndex"]]  # float16 as stored: what the tooltip shows
        assert abs(float(e["max"].split()[1]) - v) <= 5e-4 * max(1.0, abs(v))
        assert abs(v - a["maxValue"]) <= 2e-3 * max(1.0, a["maxValue"])
        assert e["shaded"] == sum(1 for j, x in enumerate(a["values"]) if x != 0 or j == a["maxValueTokenIndex"])
    # whitespace: ordinary spaces stay spaces; only newlines/tabs and leading/trailing whitespace get marks
    texts = [e["text"] for e in ex]
    assert any(" the" in t or " cat" in t for t in texts)
    for t in texts:
        inner = t.strip("␣")
        assert "␣" not in inner
    assert p.locator("#latent-view svg rect").count() > 5  # histograms drawn
    assert w.errors == [] and w.dialogs == []


def test_corpus_markup_stays_text_and_never_runs(browser, small):  # noqa: F811
    reader = Reader(small)
    hits = [i for i in range(40) if any(XSS[0] in "".join(a["tokens"]) and XSS[1] in "".join(a["tokens"])
                                        for a in reader.latent(i)["activations"])]
    assert hits, "the synthetic corpus should hold the markup line"
    w = open_viewer(browser, small)
    p = w.page
    labels = load_index(small)["columns"]["label"]
    p.fill("#q", "<script>")
    wait_shown(p, sum("<script>" in x for x in labels), 40)
    assert rows(p) and all("<script>" in r["label"] for r in rows(p))
    p.goto((small / "index.html").as_uri() + f"#/latent/{hits[0]}")
    p.wait_for_function(f"() => saeforge.timings.latentIndex === {hits[0]} && saeforge.timings.latent !== null")
    body = p.text_content("#latent-view")
    assert XSS[0] in body and XSS[1] in body
    assert p.evaluate("document.querySelectorAll('main script, main img, main iframe').length") == 0
    p.wait_for_timeout(300)
    assert w.dialogs == [] and w.errors == []


def test_index_at_65k_latents(browser, big):  # noqa: F811
    idx = load_index(big)["columns"]
    n = 65536
    w = open_viewer(browser, big)
    p = w.page
    assert p.text_content("#shown").startswith("65,536 latents")
    assert p.locator("#rows .row").count() < 200  # only the visible rows are in the DOM
    p.click("#head span[data-key=density]")
    dens = np.array(idx["density"])
    order = np.lexsort((np.arange(n), -dens))
    assert [r["index"] for r in rows(p)][:20] == order[:20].tolist()
    p.check("#alive")
    alive = int((np.array(idx["count"]) > 0).sum())
    assert p.text_content("#shown") == f"{alive:,} of 65,536 latents"
    # scroll to the end: the last rows are rendered in the same order
    p.evaluate("document.getElementById('list').scrollTop = 1e9")
    p.wait_for_timeout(200)
    last = [r["index"] for r in rows(p)][-3:]
    alive_order = [int(i) for i in order if idx["count"][int(i)] > 0]
    assert last == alive_order[-3:]
    label = idx["label"][12345]
    hits = [i for i in alive_order if label.lower() in idx["label"][i].lower()]
    p.fill("#q", label)
    wait_shown(p, len(hits), n)
    assert [r["index"] for r in rows(p)] == hits[:len(rows(p))] and 12345 in hits
    p.goto((big / "index.html").as_uri() + "#/latent/65535")
    p.wait_for_function("() => saeforge.timings.latentIndex === 65535 && saeforge.timings.latent !== null")
    assert p.text_content("h1").startswith("Latent 65535:")
    assert w.errors == [] and w.dialogs == []


def test_screenshots_hold_the_views(browser, small):  # noqa: F811
    """Pixel statistics, not file size: the index shows its green density bars and a table of text,
    the latent view its orange activation shading and histogram (kept under $SAEFORGE_SCREENSHOT_DIR)."""
    keep = os.environ.get("SAEFORGE_SCREENSHOT_DIR")
    idx = load_index(small)["columns"]
    i = max(range(40), key=lambda j: idx["count"][j])
    w = open_viewer(browser, small)
    p = w.page
    p.wait_for_selector("#density svg rect", state="attached")
    shot = p.screenshot()
    img = pixels(shot)
    green = colour_fraction(img, (0x4a, 0x8f, 0x5a), 30)
    text = float((img.max(axis=2) < 120).mean())  # dark pixels: glyphs
    assert 0.002 < green < 0.2 and 0.004 < text < 0.3, (green, text)
    p.goto((small / "index.html").as_uri() + f"#/latent/{i}")
    p.wait_for_function(f"() => saeforge.timings.latentIndex === {i} && saeforge.timings.latent !== null")
    shot2 = p.screenshot(full_page=True)
    img2 = pixels(shot2)
    orange = float(((img2[..., 0] > 200) & (img2[..., 1] > 110) & (img2[..., 1] < 215) & (img2[..., 2] < 150)).mean())
    assert orange > 0.005, orange
    blank = p.evaluate("document.body.innerText.length")
    assert blank > 500
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "viewer_index.png").write_bytes(shot)
        (Path(keep) / "viewer_latent.png").write_bytes(shot2)
    assert w.errors == [] and w.dialogs == []


def test_dashboard_rerenders_the_viewer(small, tmp_path):
    from analysis import dashboard_cli
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    (d / "viewer.js").write_text("broken")
    assert dashboard_cli.main([str(d), "--quiet"]) == 0
    assert (d / "viewer.js").read_bytes() == (small / "viewer.js").read_bytes()

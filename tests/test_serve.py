"""`saeforge serve`: the live endpoints against a direct computation with the packaged SmolLM2, every
refusal as JSON, and the viewer driven in Chromium against the real server (typing highlights
tokens, a token links to its latents, steering shows base and steered text, markup stays text)."""
from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.browser import browser, watched_page  # noqa: F401 - fixture

pytestmark = pytest.mark.smollm
HOOK = "layers.3.resid_post"
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def served(smollm2, wikitext_dir, tmp_path_factory):
    """A features directory (synthetic records over real wikitext tokens, real logits) and a live
    server for SmolLM2 + a random TopK SAE at layer 3."""
    from analysis.dashboard import install_viewer
    from analysis.features_io import write_features
    from analysis.features_synthetic import synthetic_stats
    from analysis.labels import logit_table, vocab_strings
    from analysis.serve import Live, make_server
    from sae.architectures import ArchConfig, build_sae

    torch.manual_seed(0)
    sae = build_sae(ArchConfig(arch="topk", d_in=576, d_sae=64, k=8)).eval()
    tok = smollm2.tokenizer
    text = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:20000]
    ids = np.array(tok(text, add_special_tokens=False).input_ids)
    out = tmp_path_factory.mktemp("serve")
    vocab = vocab_strings(tok, int(smollm2.model.get_output_embeddings().weight.shape[0]))
    st = synthetic_stats(64, ids, top=10, samples=8)
    write_features(out, st, vocab, logit_table(sae.W_dec.detach(), smollm2.model),
                   {"sae": {"hook_point": HOOK, "architecture": "topk", "d_sae": 64}, "model": "smollm2-135m"},
                   shard_size=32)
    install_viewer(out)
    live = Live(smollm2, sae, HOOK, prepend_bos=True)
    server = make_server(out, live, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield out, live, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
            ) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    h = {"Content-Type": "application/json", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.getheader("Content-Type", "").startswith("application/json"), (r.status, data[:200])
    return r.status, json.loads(data)


def post(port: int, path: str, doc) -> tuple[int, dict]:
    return request(port, "POST", path, json.dumps(doc).encode())


def test_tokens_are_the_sae_latents_of_the_text(served, smollm2):
    from collect.hooks import forward_to
    out, live, port = served
    text = "The cat sat on the mat.\n\tThen it  slept."
    status, doc = post(port, "/api/tokens", {"text": text, "latent": 5})
    assert status == 200
    toks = doc["tokens"]
    assert toks[0]["special"] and toks[0]["latents"] == []  # BOS: not encoded, as in the store
    assert "".join(t["text"] for t in toks[1:]) == text
    ids = [t["id"] for t in toks]
    with torch.no_grad():
        x = forward_to(smollm2.model, torch.tensor([ids]), HOOK)[HOOK][0]
        f = live.sae.encode(x[1:])
    for j, t in enumerate(toks[1:]):
        v, i = f[j].topk(8)
        keep = v > 0
        assert [p[0] for p in t["latents"]] == i[keep].tolist()
        np.testing.assert_allclose([p[1] for p in t["latents"]], v[keep].numpy(), rtol=1e-4, atol=1e-4)
        assert t["value"] == pytest.approx(float(f[j, 5]), abs=1e-4)


def test_steer_reuses_the_steering_code(served):
    out, live, port = served
    base_req = {"latent": 3, "prompt": "The weather today is", "max_new_tokens": 12, "temperature": 0}
    s0, d0 = post(port, "/api/steer", {**base_req, "coeff": 0})
    assert s0 == 200 and d0["steered"] == d0["base"] and d0["base"].strip()
    s1, d1 = post(port, "/api/steer", {**base_req, "coeff": 200})
    assert s1 == 200 and d1["base"] == d0["base"] and d1["steered"] != d1["base"]
    assert d1["hook_point"] == HOOK and d1["coeff"] == 200


def test_refusals_are_json(served):
    out, live, port = served
    assert post(port, "/api/tokens", {"text": "hi", "latent": 64})[0] == 404
    s, d = post(port, "/api/steer", {"latent": 99999, "coeff": 1, "prompt": "x"})
    assert s == 404 and "unknown latent 99999" in d["error"]
    s, d = request(port, "POST", "/api/tokens", b"x" * 70000)
    assert s == 413 and "at most" in d["error"]
    assert request(port, "POST", "/api/tokens", b"{not json")[0] == 400
    assert request(port, "POST", "/api/tokens", b'{"text":"a"}', {"Content-Type": "text/plain"})[0] == 415
    assert post(port, "/api/tokens", {"text": "a", "evil": 1})[0] == 400
    assert post(port, "/api/tokens", {"text": "word " * 600})[0] == 413
    assert post(port, "/api/steer", {"latent": 1, "coeff": float("1e9"), "prompt": "x"})[0] == 400
    assert post(port, "/api/steer", {"latent": 1, "coeff": 1, "prompt": "x", "max_new_tokens": 10 ** 6})[0] == 400
    (Path(out).parent / "secret.txt").write_text("not yours")
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/data/..%2f..%2fsecret.txt", "/data/../../secret.txt",
                 "/../../../etc/passwd"):
        s, d = request(port, "GET", path)
        assert s in (403, 404) and "error" in d and "not yours" not in json.dumps(d), path
    assert request(port, "GET", "/data/../features.json")[0] == 200  # inside the directory: fine
    assert request(port, "GET", "/nope.js")[0] == 404
    assert request(port, "GET", "/api/nope")[0] == 404
    assert request(port, "PUT", "/api/tokens", b"{}")[0] == 405
    s, d = request(port, "GET", "/api/info", headers={"Host": "evil.example"})
    assert s == 403 and "not served here" in d["error"]
    s, d = request(port, "GET", "/api/info")
    assert s == 200 and d["d_sae"] == 64 and d["hook_point"] == HOOK


def test_viewer_live_box_and_steering_in_chromium(served, browser):  # noqa: F811
    out, live, port = served
    w = watched_page(browser)
    p = w.page
    p.goto(f"http://127.0.0.1:{port}/#/live")
    p.wait_for_function("() => window.saeforge && window.saeforge.live === true")
    p.type("#live-text", "The cat sat on the mat. " + XSS, delay=5)
    p.wait_for_function("() => document.querySelectorAll('#live-tokens .tok').length > 10")
    p.wait_for_function(f"() => document.getElementById('live-tokens').textContent.includes({json.dumps(XSS)})")
    assert p.locator("#live-tokens .tok.active").count() > 5  # highlighted by their latents
    assert p.evaluate("document.querySelectorAll('main img, main script, main iframe').length") == 0
    assert p.text_content("#live-tokens").replace("\u200b", "").endswith(XSS)
    p.locator("#live-tokens .tok.active").nth(2).click()
    link = p.locator("#live-detail a").first
    target = link.get_attribute("href")
    assert target.startswith("#/latent/")
    link.click()
    i = int(target.rsplit("/", 1)[1])
    p.wait_for_function(f"() => saeforge.timings.latentIndex === {i} && saeforge.timings.latent !== null")
    assert p.text_content("h1").startswith(f"Latent {i}:")
    p.fill("input[aria-label='steering coefficient']", "0")
    p.fill("input[aria-label='tokens to generate']", "6")
    p.click("button:has-text('Steer')")
    p.wait_for_selector("pre.steered", timeout=120000)
    assert p.text_content("pre.steered") == p.text_content("pre.base") != ""
    try_box = p.locator("textarea[aria-label='try text']")
    try_box.fill(XSS)
    p.wait_for_function(f"() => Array.from(document.querySelectorAll('.panel .ex')).some(e => e.textContent.includes({json.dumps(XSS)}))")
    p.wait_for_timeout(300)
    assert w.dialogs == [] and w.errors == []

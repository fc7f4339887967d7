"""`saeforge explain`: detection scoring on known answers, the OpenAI-compatible endpoint path against a
small fake local server (key from the environment, crash and resume), and the packaged SmolLM2 as
explainer and scorer."""
from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from analysis.explain import detection_score, read_jsonl
from analysis.features_io import load_index, read_js_call
from saeforge.errors import UserError
from tests.test_dashboard_data import fake_features

KEY = "sekrit-test-key"


def test_detection_score_is_balanced_accuracy():
    truth = [True] * 4 + [False] * 4
    assert detection_score([1, 1, 1, 1, 0, 0, 0, 0], truth)["score"] == 1.0
    assert detection_score([1] * 8, truth)["score"] == 0.5  # always "yes": half right on each class
    assert detection_score([1, 1, 0, 0, 0, 0, 0, 0], truth)["score"] == 0.75  # TPR .5, TNR 1
    assert detection_score([None] * 8, truth)["score"] == 0.0  # unanswered counts as wrong
    # graded P(Yes): the top half is called active, whatever the bias
    r = detection_score([.9, .8, .7, .3, .6, .2, .1, .05], truth)
    assert r["decision"] == "top-half" and r["score"] == 0.75 and r["auroc"] == pytest.approx(15 / 16)
    assert detection_score([.99, .98, .97, .96, .95, .94, .93, .92], truth)["score"] == 1.0
    assert detection_score([1, 0], [True, True])["score"] is None


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/chat/completions: the explainer names the most frequent <<marked>> token; the scorer says
    Yes when the quoted token of the explanation is in the excerpt. The `fail_on`-th explainer request
    gets HTTP 500 (a crash mid-run)."""
    calls: list[dict] = []
    auth: list[str] = []
    fail_on: int | None = None
    explains = 0

    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.auth.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": "bad key"}})
        user = body["messages"][-1]["content"]
        if "Excerpts:" in user:
            cls.explains += 1
            if cls.explains == cls.fail_on:
                return self._send(500, {"error": {"message": "server fell over"}})
        cls.calls.append(body)
        if "Excerpts:" in user:
            marked = Counter(re.findall(r"<<(.+?)>>", user))
            answer = f'The token "{marked.most_common(1)[0][0].strip()}".' if marked else "Nothing."
        else:
            want = re.findall(r'"(.+?)"', user.split("Excerpt:")[0])
            text = user.split("Excerpt:", 1)[1].rsplit("Is the feature", 1)[0]
            answer = "Yes" if want and any(w in text for w in want) else "No"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def _send(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def fake_api():
    FakeOpenAI.calls, FakeOpenAI.auth, FakeOpenAI.fail_on, FakeOpenAI.explains = [], [], None, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def feats(tmp_path) -> Path:
    out = tmp_path / "feat"
    out.mkdir()
    fake_features(out, sae_dir=tmp_path / "sae")
    return out


def run(feats: Path, url: str, *extra: str) -> int:
    from analysis import explain_cli
    return explain_cli.main([str(feats), "--explainer", url, "--api-model", "fake", "--api-key-env", "TEST_KEY",
                             "--limit", "6", "--n-test", "6", "--batch-size", "2", "--quiet", *extra])


def test_endpoint_explains_scores_and_resumes(feats, fake_api, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    FakeOpenAI.fail_on = 3  # the first explanation of the second batch (2 latents per batch)
    with pytest.raises(UserError, match="HTTP 500"):
        run(feats, fake_api)
    header, done = read_jsonl(feats / "explanations.jsonl")
    assert header["explainer"].startswith("fake@") and sorted(done) == [0, 1]  # the first batch survived
    before = len(FakeOpenAI.calls)
    assert run(feats, fake_api) == 0
    _, done = read_jsonl(feats / "explanations.jsonl")
    redo = sum(1 + 2 * (done[i]["n_pos"] + done[i]["n_neg"]) for i in range(2, 6))
    assert len(FakeOpenAI.calls) - before == redo  # only the 4 unfinished latents were asked about
    assert set(FakeOpenAI.auth) == {f"Bearer {KEY}"}
    doc = json.loads((feats / "explanations.json").read_text(encoding="utf-8"))
    recs = {r["latent"]: r for r in doc["latents"]}
    assert sorted(recs) == list(range(6))
    cols = load_index(feats)["columns"]
    for i, r in recs.items():
        assert r["explanation"].startswith("The token ") and r["label"] == cols["label"][i]
        assert 2 <= r["n_pos"] == r["n_neg"] <= 6 and r["decision"] == "answer"
        assert 0 <= r["score"] <= 1 and 0 <= r["label_score"] <= 1
    # the named token is rarely in contexts where the latent is silent: better than chance
    assert sum(r["score"] for r in recs.values()) / 6 > 0.6
    js = read_js_call(feats / "data/explanations.js", "explanations")
    assert js["latents"] == list(range(6)) and js["explanation"] == [recs[i]["explanation"] for i in range(6)]
    assert js["score"] == [recs[i]["score"] for i in range(6)]
    # a finished run does nothing more; other settings are refused unless --overwrite
    n = len(FakeOpenAI.calls)
    assert run(feats, fake_api) == 0 and len(FakeOpenAI.calls) == n
    with pytest.raises(UserError, match="n_test"):
        run(feats, fake_api, "--n-test", "4")


class Oracle:
    """An in-process explainer + scorer that knows each latent's activating excerpts (and tells the
    truth, lies, or always says yes), to test that answers are paired with the right excerpts."""

    def __init__(self, feats: Path, mode: str, n_shown: int = 10):
        from analysis.explain import excerpt, explain_prompt
        from analysis.features_io import Reader
        from analysis.labels import label_tokens
        r = Reader(feats)
        labels = load_index(feats)["columns"]["label"]
        self.pos: dict[str, set[str]] = {}
        self.by_prompt: dict[str, str] = {}
        for i in range(r.n_latents):
            acts = r.latent(i)["activations"]
            texts = {excerpt(a["tokens"]) for a in acts}
            self.pos[f"latent {i}"] = texts
            self.pos.setdefault(label_tokens(labels[i]), set()).update(texts)
            tops = [a for a in acts if a["kind"] == "top"][:n_shown]
            self.by_prompt[explain_prompt(tops)[-1]["content"]] = f"latent {i}"
        self.mode, self.name = mode, f"oracle-{mode}"

    def generate(self, conversations, max_new_tokens):
        return [self.by_prompt[c[-1]["content"]] for c in conversations]

    def yes_prob(self, conversations):
        out = []
        for c in conversations:
            head, rest = c[-1]["content"].split("\n\nExcerpt: ", 1)
            text = rest.rsplit("\n\nIs the feature", 1)[0]
            yes = text in self.pos[head[len("Explanation: "):]]
            out.append({"truth": float(yes), "lie": float(not yes), "yes": 1.0}[self.mode])
        return out


@pytest.mark.parametrize("mode,want", [("truth", 1.0), ("lie", 0.0), ("yes", 0.5)])
def test_scores_pair_answers_with_the_right_excerpts(feats, mode, want):
    from analysis.explain import ExplainSettings, explain_latents
    oracle = Oracle(feats, mode)
    done = explain_latents(feats, oracle, oracle, ExplainSettings("o", "o", n_test=5), limit=5, batch=3)
    assert len(done) == 5
    for i, r in done.items():
        assert r["explanation"] == f"latent {i}"
        assert r["score"] == want and r["label_score"] == want and r["n_pos"] >= 2


def test_endpoint_key_errors_are_one_line(feats, fake_api, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "wrong")
    with pytest.raises(UserError, match="HTTP 401.*key"):
        run(feats, fake_api)
    monkeypatch.delenv("TEST_KEY")
    with pytest.raises(UserError, match="TEST_KEY"):
        run(feats, fake_api)
    monkeypatch.setenv("TEST_KEY", KEY)
    with pytest.raises(UserError, match="other settings.*explainer"):  # another endpoint: not mixed into one file
        run(feats, "http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match="cannot reach"):
        run(feats, "http://127.0.0.1:9/v1", "--overwrite")


def test_viewer_shows_explanations_and_scores(feats, fake_api, monkeypatch, browser):  # noqa: F811
    from tests.test_dashboard import open_viewer
    monkeypatch.setenv("TEST_KEY", KEY)
    assert run(feats, fake_api) == 0
    doc = json.loads((feats / "explanations.json").read_text(encoding="utf-8"))
    r = doc["latents"][0]
    w = open_viewer(browser, feats, f"#/latent/{r['latent']}")
    p = w.page
    p.wait_for_function("() => window.saeforge.explained === true && saeforge.timings.latent !== null")
    p.wait_for_selector(".explanation")
    assert p.text_content("#latent-view .explanation") == r["explanation"]
    line = p.text_content("#latent-view p.score")
    assert f"explanation {r['score']:.2f}" in line and f"label {r['label_score']:.2f}" in line
    p.goto((feats / "index.html").as_uri())  # the index lists explanations and scores, and searches them
    p.wait_for_function("() => window.saeforge.explained === true")
    p.fill("#q", r["explanation"][:12])
    p.wait_for_function("() => document.getElementById('shown').textContent.includes(' of ')")
    row = p.locator(f"#rows .row[data-index='{r['latent']}']")
    assert row.locator(".ex-text").text_content() == r["explanation"]
    assert row.locator(".score").text_content() == f"{r['score']:.2f}"
    assert w.errors == [] and w.dialogs == []


from tests.browser import browser  # noqa: E402,F401 - fixture


@pytest.mark.smollm
@pytest.mark.slow
def test_smollm2_explains_and_scores(smollm2, feats, monkeypatch):
    """The built-in explainer/scorer end to end (weak but real): P(Yes) is a real probability that
    depends on the explanation, and every scored latent gets both scores."""
    from analysis.explain import detect_prompt, explain_latents, ExplainSettings
    from analysis.explain_clients import LocalChat
    chat = LocalChat(smollm2, batch_size=8)
    p = chat.yes_prob([detect_prompt("The word \"cat\".", "The cat sat on the mat."),
                       detect_prompt("The word \"cat\".", "Stock prices fell sharply on Monday.")])
    assert all(0 < x < 1 for x in p) and p[0] != p[1]
    done = explain_latents(feats, chat, chat, ExplainSettings("smollm2-135m", "smollm2-135m", n_shown=5, n_test=3),
                           limit=2, batch=2)
    assert sorted(done) == [0, 1]
    for r in done.values():
        assert r["explanation"] and r["explanation"] != "(no explanation)"
        assert r["decision"] == "top-half" and 0 <= r["score"] <= 1 and 0 <= r["label_score"] <= 1

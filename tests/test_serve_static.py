"""`saeforge serve` without a model (--no-live) and the refusals of `serve` and `explain` on the command
line: static files only from the directory, JSON errors, one-line exit-2 mistakes."""
from __future__ import annotations

import http.client
import json
import threading

import pytest

from saeforge.cli import dispatch
from tests.test_dashboard_data import fake_features


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    fake_features(out)
    return out


def get(port: int, path: str) -> tuple[int, str, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.getheader("Content-Type", ""), r.read()


def test_viewer_only_server(feats):
    from analysis.serve import make_server
    server = make_server(feats, None, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        s, ctype, body = get(port, "/")
        assert s == 200 and ctype.startswith("text/html") and b"viewer.js" in body
        s, ctype, body = get(port, "/data/index.js")
        assert s == 200 and ctype.startswith("application/javascript") and body.startswith(b"saeforge.index(")
        assert get(port, "/viewer.js")[2] == (feats / "viewer.js").read_bytes()
        s, ctype, body = get(port, "/api/info")
        assert s == 503 and json.loads(body)["error"] == "live endpoints are off"
        s, _, body = get(port, "/../" + feats.name + "/../x")
        assert s == 403 and "outside" in json.loads(body)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_cli_mistakes_are_one_line(feats, tmp_path, capsys):
    assert dispatch(["serve"]) == 2
    assert dispatch(["serve", str(tmp_path)]) == 2
    assert "holds no features.json" in capsys.readouterr().err
    assert dispatch(["serve", str(feats), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert dispatch(["explain", str(tmp_path)]) == 2
    assert dispatch(["explain", str(feats), "--n-test", "0"]) == 2
    assert dispatch(["explain", str(feats), "--explainer", "http://127.0.0.1:9/v1", "--latents", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --latents 99 is out of range")
    assert not (feats / "explanations.jsonl").exists()  # refused before anything was written
    assert dispatch(["dashboard", str(tmp_path)]) == 2

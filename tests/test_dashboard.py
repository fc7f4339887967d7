"""The dashboard in a real headless Chromium, driven over the DevTools protocol (stdlib only):
pages load without console errors and the index table sorts when a header is clicked."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.dashboard import render_dashboard, token_html

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")


class DevTools:
    """A minimal WebSocket (RFC 6455) client speaking Chrome's DevTools protocol to one page."""

    def __init__(self, ws_url: str):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        assert m, ws_url
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0
        self.events: list[dict] = []

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("DevTools socket closed")
            buf += part
        return buf

    def _recv_message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            if b0 & 0x0F == 8:
                raise ConnectionError("DevTools closed the connection")
            if b0 & 0x0F in (0, 1, 2):
                data += payload
                if b0 & 0x80:
                    return json.loads(data)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        msg = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        n = len(msg)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(c ^ mask[j % 4] for j, c in enumerate(msg)))
        while True:
            r = self._recv_message()
            if r.get("id") == self.next_id:
                if "error" in r:
                    raise RuntimeError(r["error"])
                return r.get("result", {})
            self.events.append(r)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            for e in self.events:
                if e.get("method") == method:
                    self.events.remove(e)
                    return e
            self.events.append(self._recv_message())
        raise TimeoutError(method)

    def evaluate(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300] + " " + p["entry"].get("url", ""))
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    prof = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={prof}",
                             "--remote-allow-origins=*", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    end = time.time() + 30
    while time.time() < end and port is None:
        line = proc.stderr.readline()
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line or "")
        if m:
            port = int(m.group(1))
        elif not line and proc.poll() is not None:
            break
    if port is None:
        proc.kill()
        pytest.fail("chromium did not start its DevTools endpoint")
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def open_page(port: int, url: str) -> DevTools:
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
    page = next(t for t in targets if t.get("type") == "page")
    dt = DevTools(page["webSocketDebuggerUrl"])
    dt.send("Page.enable")
    dt.send("Runtime.enable")
    dt.send("Log.enable")
    dt.events.clear()
    dt.send("Page.navigate", url=url)
    dt.wait_event("Page.loadEventFired")
    return dt


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> Path:
    """A dashboard from a small synthetic store-free run: real stats code on fake records."""
    from tests.test_dashboard_data import fake_features
    out = tmp_path_factory.mktemp("dash")
    fake_features(out)
    render_dashboard(out)
    return out


def test_whitespace_markers():
    assert token_html(" a\n\t<") == '<span class="ws">␣</span>a<span class="ws">↵</span>\n<span class="ws">⇥</span>&lt;'


@needs_chromium
def test_index_loads_and_sorts(browser, dashboard):
    dt = open_page(browser, (dashboard / "index.html").as_uri())
    assert dt.evaluate("document.querySelectorAll('#latents tbody tr').length") == 40
    order = lambda: dt.evaluate("Array.from(document.querySelectorAll('#latents tbody tr')).map(r => +r.dataset.index)")  # noqa: E731
    col = lambda key: dt.evaluate(  # noqa: E731
        f"Array.from(document.querySelectorAll('#latents tbody tr')).map(r => +r.dataset['{key}'])")
    assert order() == list(range(40))
    dt.evaluate("document.querySelector('th[data-key=max]').click()")
    m = col("max")
    assert m == sorted(m, reverse=True) and order() != list(range(40))
    dt.evaluate("document.querySelector('th[data-key=max]').click()")
    assert col("max") == sorted(m)
    dt.evaluate("document.querySelector('th[data-key=density]').click()")
    d = col("density")
    assert d == sorted(d, reverse=True)
    assert dt.evaluate("document.querySelector('th[data-key=density]').getAttribute('aria-sort')") == "descending"
    # filter by label text, then "fired only"
    dt.evaluate("var f=document.getElementById('filter'); f.value='tok7'; f.dispatchEvent(new Event('input'))")
    shown = dt.evaluate("Array.from(document.querySelectorAll('#latents tbody tr')).filter(r => r.style.display !== 'none')"
                        ".map(r => r.dataset.label)")
    assert shown and all("tok7" in s.lower() for s in shown)
    assert dt.errors() == []


@needs_chromium
def test_latent_page_loads(browser, dashboard):
    dt = open_page(browser, (dashboard / "latents" / "00003.html").as_uri())
    assert dt.evaluate("document.querySelectorAll('.ex').length") > 0
    tip = dt.evaluate("document.querySelector('.t.max').title")
    assert "activation" in tip
    assert dt.evaluate("document.querySelectorAll('svg rect').length") > 0
    assert dt.evaluate("document.querySelectorAll('.ws').length") > 0  # whitespace made visible
    assert dt.errors() == []


@needs_chromium
def test_screenshot(dashboard, tmp_path):
    """The screenshot a person looks at (kept under $SAEFORGE_SCREENSHOT_DIR when set)."""
    keep = os.environ.get("SAEFORGE_SCREENSHOT_DIR")
    for name, url in (("index", dashboard / "index.html"), ("latent", dashboard / "latents" / "00003.html")):
        png = tmp_path / f"{name}.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                        "--window-size=1200,900", f"--user-data-dir={tmp_path / 'prof'}", url.as_uri()],
                       check=True, capture_output=True, timeout=60)
        assert png.stat().st_size > 10_000
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(png, Path(keep) / f"dashboard_{name}.png")

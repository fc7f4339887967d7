"""`saeforge serve`: the viewer of a features directory over HTTP, plus live endpoints backed by the
model and SAE the directory was made from (loaded once).

    GET  /                      the viewer (index.html, viewer.js, data/… of the directory)
    GET  /api/info              model, hook point, number of latents, request limits
    POST /api/tokens            {"text": str, "latent"?: int} → each token with its top latents
                                (and that latent's value when asked)
    POST /api/steer             {"latent": int, "coeff": float, "prompt": str, "max_new_tokens"?: int,
                                 "seed"?: int, "temperature"?: float} → base and steered generations

Steering reuses analysis.steer_apply.steer (x + coeff·W_dec[latent] where the dictionary writes, every
position: an SAE's hook point, a transcoder's target, each of a crosscoder's layers) and
analysis.steer_eval.generate (same seed for both runs). Live text is encoded from what the dictionary
reads (a transcoder's input; a crosscoder's hook points side by side, from one forward). Every refusal is JSON
`{"error": "..."}` with a 4xx status: oversized bodies (413), non-JSON (400), unknown latents (404),
paths outside the directory (403/404), requests for another Host (403, against DNS rebinding).
"""
from __future__ import annotations

import json
import logging
import math
import mimetypes
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

from analysis.features import encode_triples
from analysis.features_io import load_features
from saeforge.errors import UserError
from sae.architectures import SAE

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024          # bytes of a request body
MAX_TEXT_TOKENS = 512         # tokens of live text
MAX_NEW_TOKENS = 128          # tokens one steer request may generate
MAX_PROMPT_CHARS = 2000
TOP_LATENTS = 8               # latents listed per token
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiError(Exception):
    """A refused request: HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Live:
    """The model, tokenizer and SAE behind the live endpoints."""
    lm: Any                    # collect.model.LoadedModel
    sae: SAE
    hook: str                  # the (first) hook point read
    prepend_bos: bool = True
    inputs: list[str] | None = None   # hook points read, side by side (default [hook])
    outputs: list[str] | None = None  # hook points the decoder writes, in its layer order (default: inputs)

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec.shape[0])

    def __post_init__(self) -> None:
        self.lock = threading.Lock()  # hooks are per model: one request at a time
        self.inputs = list(self.inputs or [self.hook])
        self.outputs = list(self.outputs or self.inputs)

    @classmethod
    def from_features(cls, features_dir: str | Path, device: str = "cpu", model: str | None = None,
                      sae_dir: str | None = None) -> "Live":
        """Load what DIR/features.json records (or the given overrides), checking it matches the data."""
        from collect.model import load_model
        from sae.io import load_sae
        doc = load_features(features_dir)
        sae_path = sae_dir or (doc.get("sae") or {}).get("path")
        spec = model or doc.get("model")
        if not sae_path or not spec:
            raise UserError(f"{str(features_dir)!r}/features.json records no SAE path or model; pass --sae and --model")
        sae = load_sae(sae_path, device)
        n = int(doc["layout"]["n_latents"])
        if int(sae.W_dec.shape[0]) != n:
            raise UserError(f"the SAE in {sae_path!r} has {int(sae.W_dec.shape[0])} latents but the features in "
                            f"{str(features_dir)!r} have {n}; pass --sae with the SAE they were made from")
        lm = load_model(spec, device)
        want = doc.get("model_hash")
        if model is None and want and lm.weights_hash != want:
            raise UserError(f"model {spec!r} now has weights hash {lm.weights_hash[:12]} but the features were made "
                            f"with {want[:12]}; pass --model with the model of the store")
        from sae.io import dict_points
        ins, outs = dict_points(doc.get("sae") or {})
        if not ins:
            raise UserError(f"{str(features_dir)!r}/features.json records no hook point; rerun `saeforge features`")
        bos = doc.get("prepend_bos")
        return cls(lm, sae, ins[0], True if bos is None else bool(bos), inputs=ins, outputs=outs)

    # ---- the endpoints ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.spec, "hook_point": self.hook, "hook_points": self.inputs,
                "output_hook_points": self.outputs, "d_sae": self.d_sae,
                "limits": {"body_bytes": MAX_BODY, "text_tokens": MAX_TEXT_TOKENS, "max_new_tokens": MAX_NEW_TOKENS,
                           "prompt_chars": MAX_PROMPT_CHARS}}

    def check_latent(self, value: Any) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(400, f"latent must be an integer, got {value!r}")
        if not 0 <= value < self.d_sae:
            raise ApiError(404, f"unknown latent {value}: this SAE has latents 0..{self.d_sae - 1}")
        return value

    @torch.no_grad()
    def tokens(self, text: Any, latent: Any = None) -> dict[str, Any]:
        """Each token of `text` with its top latents [(latent, value)…] (special tokens are not encoded,
        as the store's keep mask leaves them out)."""
        if not isinstance(text, str):
            raise ApiError(400, "text must be a string")
        want = self.check_latent(latent)
        tok = self.lm.tokenizer
        ids = tok(text, add_special_tokens=False).input_ids
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.prepend_bos and bos is not None:
            ids = [bos] + ids
        if len(ids) > MAX_TEXT_TOKENS:
            raise ApiError(413, f"text is {len(ids)} tokens; the live box takes at most {MAX_TEXT_TOKENS}")
        out: list[dict[str, Any]] = []
        if not ids:
            return {"tokens": out}
        special = set(getattr(tok, "all_special_ids", []) or [])
        with self.lock:
            x_all = torch.tensor([ids], device=self.lm.device)
            acts = self._read(x_all)
            enc = [j for j, t in enumerate(ids) if t not in special]
            per: dict[int, list[tuple[int, float]]] = {j: [] for j in range(len(ids))}
            if enc:
                rows, lats, vals = encode_triples(self.sae, acts[enc].to(self.sae.W_dec.device))
                for r, la, v in zip(rows.tolist(), lats.tolist(), vals.tolist()):
                    per[enc[r]].append((la, v))
        texts = tok.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)
        for j, (t, s) in enumerate(zip(ids, texts)):
            lat = sorted(per[j], key=lambda p: -p[1])
            item: dict[str, Any] = {"text": s, "id": t, "special": t in special,
                                    "latents": [[la, round(v, 5)] for la, v in lat[:TOP_LATENTS]]}
            if want is not None:
                item["value"] = round(next((v for la, v in lat if la == want), 0.0), 5)
            out.append(item)
        return {"tokens": out}

    def _read(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, width] what the dictionary reads at each position of one sequence, from one forward."""
        from analysis.directions import canonical_point
        from collect.hooks import forward_to
        assert self.inputs is not None
        got = forward_to(self.lm.model, ids, self.inputs)
        return torch.cat([got[canonical_point(self.lm.model, h)][0].float() for h in self.inputs], -1)

    def steer(self, latent: Any, coeff: Any, prompt: Any, max_new_tokens: Any = 30, seed: Any = 0,
              temperature: Any = 0.8) -> dict[str, Any]:
        """Base and steered continuations of `prompt`, steering with x + coeff·W_dec[latent] where it writes."""
        from analysis.directions import SteeringVector, canonical_point, latent_directions
        from analysis.steer_apply import steer
        from analysis.steer_eval import encode, generate
        from analysis.steer_sampling import Sampling
        i = self.check_latent(latent)
        if i is None:
            raise ApiError(400, "latent is required")
        c = _number("coeff", coeff, -1e4, 1e4)
        n = int(_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True))
        s = int(_number("seed", seed, 0, 2**31 - 1, integer=True))
        temp = _number("temperature", temperature, 0.0, 5.0)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ApiError(413, f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        model, tok = self.lm.model, self.lm.tokenizer
        with self.lock:
            assert self.outputs is not None
            dirs = {canonical_point(model, o): v for o, v in latent_directions(self.sae, i, self.outputs).items()}
            point = ",".join(dirs)
            sv = SteeringVector(dirs, {"source": f"sae latent {i}", "source_point": point})
            ids = encode(tok, prompt)
            sampling = Sampling(temperature=temp, seed=s)  # llama.cpp's chain and defaults, as `saeforge steer`
            base = generate(model, tok, ids, n, sampling)
            steered = generate(model, tok, ids, n, sampling, ctx=steer(model, sv, coeff=c))
        return {"latent": i, "coeff": c, "prompt": prompt, "hook_point": point, "seed": s, "temperature": temp,
                "base": tok.decode(base, skip_special_tokens=True), "steered": tok.decode(steered, skip_special_tokens=True)}


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}")
    if integer and int(value) != value:
        raise ApiError(400, f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} {value!r} is out of range [{lo:g}, {hi:g}]")
    return float(value)


# ---- HTTP --------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Static files of one directory and the JSON API; set `root`, `live`, `hosts` on a subclass."""
    root: Path
    live: Live | None
    hosts: frozenset[str] | None  # None: any Host (a non-loopback bind the user chose)
    server_version = "saeforge"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").lower()
        if self.hosts is None or host in self.hosts:
            return True
        self._error(403, f"Host {host!r} is not served here; open http://{sorted(self.hosts)[0]}/")
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path.startswith("/api/"):
            if path == "/api/info" and self.live is not None:
                return self._json(200, self.live.info())
            return self._error(404 if self.live is not None else 503,
                               f"no endpoint GET {path}" if self.live is not None else "live endpoints are off")
        self._static(path)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        try:
            if self.live is None:
                raise ApiError(503, "live endpoints are off (the model was not loaded)")
            fn = {"/api/tokens": self._tokens, "/api/steer": self._steer}.get(path)
            if fn is None:
                raise ApiError(404, f"no endpoint POST {path}")
            self._json(200, fn(self._body()))
        except ApiError as e:
            self._error(e.status, str(e))
        except UserError as e:
            self._error(400, str(e))

    def _refuse(self) -> None:
        self._error(405, f"method {self.command} is not allowed; use GET or POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _body(self) -> dict[str, Any]:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        n = self.headers.get("Content-Length")
        if n is None or not n.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        if int(n) > MAX_BODY:
            self.close_connection = True
            if int(n) <= 16 * MAX_BODY:  # read it so the client sees the answer, not a reset
                self.rfile.read(int(n))
            raise ApiError(413, f"request body is {n} bytes; at most {MAX_BODY}")
        raw = self.rfile.read(int(n))
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"request body is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "request body must be a JSON object")
        return doc

    def _tokens(self, doc: dict[str, Any]) -> dict[str, Any]:
        _only(doc, {"text", "latent"})
        assert self.live is not None
        return self.live.tokens(doc.get("text"), doc.get("latent"))

    def _steer(self, doc: dict[str, Any]) -> dict[str, Any]:
        _only(doc, {"latent", "coeff", "prompt", "max_new_tokens", "seed", "temperature"})
        assert self.live is not None
        kw = {k: doc[k] for k in ("max_new_tokens", "seed", "temperature") if k in doc}
        return self.live.steer(doc.get("latent"), doc.get("coeff", 1.0), doc.get("prompt"), **kw)

    def _static(self, path: str) -> None:
        rel = unquote(path).lstrip("/") or "index.html"
        if "\x00" in rel or "\\" in rel:
            return self._error(400, "bad path")
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root):
            return self._error(403, f"{path!r} is outside the served directory")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            return self._error(404, f"{path!r} not found")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        self._send(200, target.read_bytes(), ctype)


def _only(doc: dict[str, Any], keys: set[str]) -> None:
    extra = sorted(set(doc) - keys)
    if extra:
        raise ApiError(400, f"unknown field(s) {extra}; this endpoint takes {sorted(keys)}")


def make_server(features_dir: str | Path, live: Live | None, host: str = "127.0.0.1", port: int = 8000
                ) -> ThreadingHTTPServer:
    """A server for one features directory (port 0 picks a free port); `serve_forever()` runs it."""
    root = Path(features_dir).resolve()
    load_features(root)
    if not (root / "index.html").is_file():
        from analysis.dashboard import install_viewer
        install_viewer(root)
    handler: Any = type("BoundHandler", (Handler,), {"root": root, "live": live, "hosts": frozenset()})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    p = server.server_address[1]
    if host in ("127.0.0.1", "localhost", "::1"):  # loopback: only our own names (DNS rebinding)
        names = {"127.0.0.1", "localhost", "[::1]"}
        handler.hosts = frozenset(f"{h}:{p}" for h in names) | (frozenset(names) if p == 80 else frozenset())
    else:
        handler.hosts = None
    return server


mimetypes.add_type("application/javascript", ".js")
mimetypes.add_type("text/css", ".css")

__all__ = ["Live", "ApiError", "make_server", "MAX_BODY", "MAX_TEXT_TOKENS", "MAX_NEW_TOKENS"]

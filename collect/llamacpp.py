"""llama.cpp as a second backend: a GGUF model run as llama.cpp runs it (quantised weights, its own
kernels and tokenizer), through the C API that the `llama-cpp-python` bindings expose.

Intermediate tensors are read with llama.cpp's eval callback (`cb_eval`): the scheduler asks, for
every node of the compute graph, whether we want it, computes up to it and hands it over. llama.cpp
names its graph tensors `NAME-LAYER` (`cb(cur, "l_out", il)` → `l_out-6`), and these names map to
saeforge's hook points as follows (checked against the PyTorch model, see compare-backends):

    layers.{i}.resid_post  l_out-{i}       output of block i (where control vectors are added)
    layers.{i}.resid_pre   l_out-{i-1}     (i ≥ 1)
    layers.{i}.attn_out    attn_out-{i}    attention output after its output projection
    layers.{i}.mlp_out     ffn_out-{i}     the FFN output (llama.cpp gives the residual sum after it
                                           the same name; that one is told apart and skipped)
    final_norm             result_norm

The token embedding (`embed`, `layers.0.resid_pre`) has no name in llama.cpp's graph and is refused.
resid_post/resid_pre hold for every architecture whose graph emits `l_out` (most of them); the
others are verified for the `llama` graph only and refused elsewhere. The forward stops right after
the deepest tensor needed (the callback returns false), as saeforge's PyTorch hooks do.
Control vectors are loaded as llama.cpp's `common_control_vector_load` does (common/common.cpp) and
handed to `llama_set_adapter_cvec`, which adds them inside llama.cpp's graph.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saeforge.errors import UserError

log = logging.getLogger(__name__)

INSTALL = "pip install 'saeforge[llama]' (it compiles llama.cpp from source: ~10 min on 2 cores)"
VERIFIED_ARCHS = ("llama",)  # graphs whose attn_out / ffn_out / inp_embd / result_norm names are checked
_POINT_RE = re.compile(r"^layers\.(-?\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$")
GGML_TYPE_F32 = 0
GGML_OP_ADD = 2
_NO_EMBED = ("hook point {point!r} is the token embedding, which llama.cpp's graph leaves unnamed (its inp_embd "
             "is the input for embedding vectors, unused with tokens); with --backend llama.cpp use "
             "layers.N.resid_post or layers.N.resid_pre with N ≥ 1")


class _GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h), read-only here."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


_NAME_OFFSET = _GGMLTensor.name.offset  # type: ignore[attr-defined]
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=40)
_STATE: dict[str, Any] = {}


def bindings() -> Any:
    """The `llama_cpp` module, with llama.cpp's log routed to `logging` (debug); one clear line if missing."""
    if "L" in _STATE:
        return _STATE["L"]
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"the llama.cpp backend needs the llama-cpp-python bindings, which are not installed; "
                        f"{INSTALL}") from None
    except (OSError, RuntimeError) as e:
        raise UserError(f"llama-cpp-python is installed but its llama.cpp library does not load ({e}); "
                        f"reinstall it: {INSTALL}") from None

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", "replace")
        _LOG_TAIL.append(msg)
        log.debug("llama.cpp: %s", msg.rstrip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    base = ctypes.CDLL(str(Path(llama_cpp.llama_cpp._base_path) / "libggml-base.so"))
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_tensor_get.restype = None
    _STATE.update(L=llama_cpp, on_log=on_log, tensor_get=base.ggml_backend_tensor_get)
    return llama_cpp


def available() -> str | None:
    """None when the bindings load, else the reason (for tests that skip and CLIs that refuse)."""
    try:
        bindings()
        return None
    except UserError as e:
        return str(e)


def _last_error() -> str:
    """The most telling line llama.cpp logged: the reason ("unknown model architecture: …") before
    the generic "error"/"failed" lines that follow it."""
    lines = [m.strip() for m in _LOG_TAIL if m.strip()]
    for word in ("unknown", "error", "failed"):
        hits = [m for m in lines if word in m.lower()]
        if hits:
            return hits[-1]
    return (lines or ["no message"])[-1]


def gguf_fingerprint(path: str | os.PathLike, samples: int = 64, piece: int = 1 << 16) -> str:
    """A cheap fingerprint of a GGUF file: its size, its first MiB (header, metadata, tensor index)
    and `samples` strided 64 KiB pieces of the tensor data. Hashing every byte of a 5 GB file takes
    tens of seconds; this catches a different file or quantisation in milliseconds."""
    h = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    h.update(f"gguf:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for k in range(samples):
            f.seek(int(size * k / samples))
            h.update(f.read(piece))
    return h.hexdigest()


@dataclass(frozen=True)
class GraphPoint:
    """A saeforge hook point and the llama.cpp graph tensor that holds it."""
    name: str            # canonical hook point, e.g. layers.6.resid_post
    tensor: str          # llama.cpp graph name, e.g. l_out-6
    layer: int           # block index (-1 for embed, n_layer for final_norm): for stop order
    order: int           # position within the block in graph order
    all_outputs: bool    # the tensor exists only for output rows unless every token is an output


def graph_point(point: str, n_layer: int, arch: str) -> GraphPoint:
    """Map a hook point to the llama.cpp tensor holding it, or refuse with one line."""
    point = point.strip()
    verified = arch in VERIFIED_ARCHS
    if point == "embed":
        raise UserError(_NO_EMBED.format(point=point))
    if point == "final_norm":
        if not verified:
            raise UserError(f"hook point {point!r}: llama.cpp's {arch!r} graph is not verified to expose it; "
                            f"use layers.N.resid_post or layers.N.resid_pre with --backend llama.cpp")
        return GraphPoint("final_norm", "result_norm", n_layer, 0, True)
    m = _POINT_RE.match(point)
    if not m:
        raise UserError(f"hook point {point!r} is not known; use layers.N.resid_post|resid_pre|attn_out|mlp_out, "
                        f"embed or final_norm")
    i, site = int(m.group(1)), m.group(2)
    if i < 0:
        i += n_layer
    if not 0 <= i < n_layer:
        raise UserError(f"hook point {point!r}: layer {m.group(1)} is out of range for this {n_layer}-layer model "
                        f"(use 0..{n_layer - 1} or negative indices)")
    name = f"layers.{i}.{site}"
    if site == "resid_post":
        return GraphPoint(name, f"l_out-{i}", i, 3, i == n_layer - 1)
    if site == "resid_pre":
        if i == 0:
            raise UserError(_NO_EMBED.format(point=name))
        return GraphPoint(name, f"l_out-{i - 1}", i - 1, 3, False)
    if not verified:
        raise UserError(f"hook point {name!r}: llama.cpp's {arch!r} graph is not verified to expose {site} "
                        f"(only the llama graph is); use layers.N.resid_post or resid_pre with --backend llama.cpp")
    if site == "attn_out":
        return GraphPoint(name, f"attn_out-{i}", i, 1, False)
    return GraphPoint(name, f"ffn_out-{i}", i, 2, False)


class _Capture:
    """The eval callback's state: which tensors to copy, what was copied, when to stop."""

    def __init__(self) -> None:
        self.want: dict[bytes, str] = {}     # graph tensor name → key in `got`
        self.got: dict[str, list[np.ndarray]] = {}
        self.stop_after = 0                  # stop the graph after this many copies per ubatch (0: never)
        self.seen = 0
        self.error: str | None = None

    def arm(self, tensors: Sequence[str], stop: bool) -> None:
        self.want = {t.encode(): t for t in tensors}
        self.got = {t: [] for t in tensors}
        self.stop_after = len(self.want) if stop else 0
        self.seen = 0
        self.error = None

    def disarm(self) -> None:
        self.want = {}

    def __call__(self, t: int, ask: bool, user: Any) -> bool:
        try:
            name = ctypes.string_at(t + _NAME_OFFSET)
            key = self.want.get(name)
            if key is None:
                return False
            tt = _GGMLTensor.from_address(t)
            if name.startswith(b"ffn_out-") and tt.op == GGML_OP_ADD and tt.src[1] and \
                    ctypes.string_at(tt.src[1] + _NAME_OFFSET).startswith(b"ffn_inp-"):
                return False   # the residual sum after the FFN, which llama.cpp also names ffn_out
            if ask:
                return True
            d, rows = int(tt.ne[0]), int(tt.ne[1])
            if tt.type != GGML_TYPE_F32 or tt.ne[2] != 1 or tt.ne[3] != 1 or tt.nb[1] != 4 * d:
                self.error = f"tensor {key} is not a contiguous float32 [n_embd, n_tokens] matrix"
                return False
            buf = np.empty((rows, d), dtype=np.float32)
            _STATE["tensor_get"](t, buf.ctypes.data, 0, buf.nbytes)
            self.got[key].append(buf)
            self.seen += 1
            if self.stop_after and self.seen == self.stop_after:
                self.seen = 0
                return False   # everything needed from this ubatch is read: skip the rest of the graph
            return True
        except Exception as e:  # noqa: BLE001 - an exception must not cross the C boundary
            self.error = f"{type(e).__name__}: {e}"
            return False


def load_control_vector(paths: Sequence[tuple[str | os.PathLike, float]], n_embd: int, n_layer: int
                        ) -> np.ndarray:
    """`[(file, strength), …]` → the `[n_layer − 1, n_embd]` buffer llama.cpp's loader builds:
    `direction.k` × strength summed into row k − 1 (layer 0 has no slot). Where llama.cpp would skip
    a file or a layer silently (wrong width, k = 0, k ≥ n_layer), this refuses with one line."""
    import gguf
    data = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for path, strength in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"control vector {str(path)!r} not found")
        try:
            reader = gguf.GGUFReader(str(p))
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, … on foreign files
            raise UserError(f"control vector {str(path)!r} is not a GGUF file ({type(e).__name__}: {e})") from None
        if not reader.tensors:
            raise UserError(f"control vector {str(path)!r} holds no direction.N tensors")
        for t in reader.tensors:
            m = re.fullmatch(r"direction\.(\d+)", t.name)
            if not m or int(m.group(1)) == 0:
                raise UserError(f"control vector {str(path)!r}: tensor {t.name!r} is not direction.K with K ≥ 1; "
                                f"llama.cpp skips the whole file")
            k = int(m.group(1))
            vec = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise UserError(f"control vector {str(path)!r}: {t.name} must be a 1-D float32 tensor")
            if vec.size != n_embd:
                raise UserError(f"control vector {str(path)!r}: {t.name} has {vec.size} values but the model's "
                                f"n_embd is {n_embd}; llama.cpp would refuse it — export it from this model")
            if k >= n_layer:
                raise UserError(f"control vector {str(path)!r}: {t.name} is past the model's last steerable block "
                                f"({n_layer - 1}); llama.cpp would ignore it silently")
            data[k - 1] += strength * vec
    return data


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp: tokenize, read named graph tensors, steer, generate."""

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, n_gpu_layers: int = 0):
        L = bindings()
        self.L = L
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"model file {self.path!r} not found")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{self.path!r} is not a GGUF file; --backend llama.cpp takes a .gguf model "
                                f"(convert HF models with llama.cpp's convert_hf_to_gguf.py)")
        if n_gpu_layers and not L.llama_supports_gpu_offload():
            raise UserError("this llama.cpp build has no GPU backend; use --device cpu with --backend llama.cpp "
                            "(or reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on)")
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        _LOG_TAIL.clear()
        self.model = L.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp cannot load {self.path!r}: {_last_error()}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_embd = int(L.llama_model_n_embd(self.model))
        self.n_layer = int(L.llama_model_n_layer(self.model))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.arch = self.meta("general.architecture") or "?"
        self.quantization = (L.llama_ftype_name(L.llama_model_ftype(self.model)) or b"?").decode()
        self.n_threads = n_threads or max(1, (os.cpu_count() or 1))
        self._capture = _Capture()
        self._cb = L.ggml_backend_sched_eval_callback(self._capture)
        self._ctx: Any = None
        self._ctx_key: tuple[int, bool] | None = None
        self._cvec: np.ndarray | None = None

    # ---- metadata and tokens ------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def special_ids(self) -> list[int]:
        """Control tokens (BOS, EOS, chat markers …): what the collector marks keep = false."""
        ctrl = self.L.LLAMA_TOKEN_ATTR_CONTROL
        return [t for t in range(self.n_vocab) if self.L.llama_vocab_get_attr(self.vocab, t) & ctrl]

    def bos(self) -> int | None:
        t = int(self.L.llama_vocab_bos(self.vocab))
        return None if t < 0 else t

    def eos(self) -> int | None:
        t = int(self.L.llama_vocab_eos(self.vocab))
        return None if t < 0 else t

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def chat_prompt(self, text: str) -> str:
        """The user message wrapped in the model's chat template, as llama.cpp applies it."""
        L = self.L
        tmpl = L.llama_model_chat_template(self.model, None)
        if not tmpl:
            raise UserError("--chat: this GGUF has no chat template; drop --chat for a base model")
        msg = (L.llama_chat_message * 1)(L.llama_chat_message(role=b"user", content=text.encode("utf-8")))
        cap = 4 * len(text.encode()) + 1024
        buf = ctypes.create_string_buffer(cap)
        n = L.llama_chat_apply_template(tmpl, msg, 1, True, buf, cap)
        if n < 0:
            raise UserError("--chat: llama.cpp does not know this model's chat template; drop --chat")
        if n > cap:
            buf = ctypes.create_string_buffer(n + 1)
            n = L.llama_chat_apply_template(tmpl, msg, 1, True, buf, n + 1)
        return buf.raw[:n].decode("utf-8", "replace")

    # ---- context ------------------------------------------------------------------------------

    def _context(self, n_ctx: int, capture: bool) -> Any:
        """A context of at least n_ctx tokens (one sequence), with the eval callback if `capture`."""
        L = self.L
        if self._ctx is not None and self._ctx_key is not None and self._ctx_key[0] >= n_ctx \
                and self._ctx_key[1] == capture:
            return self._ctx
        self._free_ctx()
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_ubatch = min(n_ctx, 512)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        if capture:
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        _LOG_TAIL.clear()
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise UserError(f"llama.cpp could not create a context of {n_ctx} tokens: {_last_error()}")
        self._ctx, self._ctx_key = ctx, (n_ctx, capture)
        if self._cvec is not None:
            self._apply_cvec()
        return ctx

    def _free_ctx(self) -> None:
        if self._ctx is not None:
            self.L.llama_free(self._ctx)
            self._ctx, self._ctx_key = None, None

    def close(self) -> None:
        self._free_ctx()
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # contexts hold C memory; free it when the wrapper goes
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _decode(self, ctx: Any, tokens: Sequence[int], start: int, outputs: str) -> None:
        """Decode `tokens` at positions start… of sequence 0; outputs: none, last or all."""
        L = self.L
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for j, tok in enumerate(tokens):
                batch.token[j] = int(tok)
                batch.pos[j] = start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = outputs == "all" or (outputs == "last" and j == n - 1)
            batch.n_tokens = n
            rc = L.llama_decode(ctx, batch)
        finally:
            L.llama_batch_free(batch)
        if rc != 0:
            raise UserError(f"llama.cpp failed to decode {n} tokens (code {rc}): {_last_error()}")

    # ---- reading graph tensors ----------------------------------------------------------------

    def hidden(self, tokens: np.ndarray, points: Sequence[GraphPoint]) -> dict[str, np.ndarray]:
        """`tokens [B, T]` → `{hook point: float32 [B, T, n_embd]}`, one decode per sequence, each
        forward stopped after the deepest tensor needed."""
        return self._run(tokens, points, logits=False)[0]

    def hidden_and_logits(self, tokens: np.ndarray, points: Sequence[GraphPoint]
                          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """As `hidden`, running the whole model, plus the logits `[B, T, n_vocab]` at every position."""
        acts, logits = self._run(tokens, points, logits=True)
        assert logits is not None
        return acts, logits

    def _run(self, tokens: np.ndarray, points: Sequence[GraphPoint], logits: bool
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        tokens = np.asarray(tokens)
        b, t = tokens.shape
        tensors = sorted({p.tensor for p in points})
        all_out = logits or any(p.all_outputs for p in points)
        ctx = self._context(t, capture=True)
        mem = self.L.llama_get_memory(ctx)
        out = {p.name: np.empty((b, t, self.n_embd), dtype=np.float32) for p in points}
        lg = np.empty((b, t, self.n_vocab), dtype=np.float32) if logits else None
        cap = self._capture
        try:
            for row in range(b):
                cap.arm(tensors, stop=not all_out)
                self.L.llama_memory_clear(mem, True)
                self._decode(ctx, tokens[row].tolist(), 0, "all" if all_out else "none")
                if cap.error:
                    raise UserError(f"llama.cpp eval callback: {cap.error}")
                for p in points:
                    parts = cap.got[p.tensor]
                    if not parts:
                        raise UserError(f"llama.cpp's {self.arch!r} graph has no tensor named {p.tensor!r} for "
                                        f"{p.name}; use another hook point (layers.N.resid_post is l_out-N)")
                    rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
                    if rows.shape != (t, self.n_embd):
                        raise UserError(f"llama.cpp tensor {p.tensor!r} has shape {rows.shape}, expected "
                                        f"{(t, self.n_embd)}")
                    out[p.name][row] = rows
                if lg is not None:
                    lg[row] = np.ctypeslib.as_array(self.L.llama_get_logits(ctx), shape=(t, self.n_vocab))
        finally:
            cap.disarm()
        return out, lg

    # ---- steering and generation --------------------------------------------------------------

    def set_control_vector(self, data: np.ndarray | None, layer_start: int = 1, layer_end: int | None = None) -> None:
        """Install a `[n_layer − 1, n_embd]` control vector (row k − 1 is added to block k's output, as
        `llama_set_adapter_cvec` defines), or remove it with None."""
        if data is not None:
            data = np.ascontiguousarray(data, dtype=np.float32)
            if data.shape != (self.n_layer - 1, self.n_embd):
                raise UserError(f"control vector has shape {data.shape}, the model needs "
                                f"{(self.n_layer - 1, self.n_embd)}")
        self._cvec = data
        self._cvec_range = (layer_start, layer_end if layer_end is not None else self.n_layer)
        if self._ctx is not None:
            self._apply_cvec()

    def _apply_cvec(self) -> None:
        L = self.L
        if self._cvec is None:
            rc = L.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
        else:
            ptr = self._cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = L.llama_set_adapter_cvec(self._ctx, ptr, self._cvec.size, self.n_embd, *self._cvec_range)
        if rc != 0:
            raise UserError(f"llama.cpp refused the control vector: {_last_error()}")

    def sampler(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int = 0) -> Any:
        """llama.cpp's default sampler chain (common/sampling.cpp) with these settings: penalties →
        top-k → top-p → min-p → temperature → dist (temperature ≤ 0 keeps only the best token: greedy)."""
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        last_n = repeat_last_n if repeat_last_n >= 0 else (self._ctx_key[0] if self._ctx_key else 4096)  # -1: ctx
        for s in (L.llama_sampler_init_penalties(self.n_vocab, last_n, repeat_penalty, 0.0, 0.0),
                  L.llama_sampler_init_top_k(top_k), L.llama_sampler_init_top_p(top_p, 0),
                  L.llama_sampler_init_min_p(min_p, 0), L.llama_sampler_init_temp_ext(temperature, 0.0, 1.0),
                  L.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
            L.llama_sampler_chain_add(chain, s)
        return chain

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True,
                 **sampling: Any) -> tuple[list[int], list[float]]:
        """Continue `prompt` with llama.cpp's sampler chain; returns (new tokens, margin of each step:
        top-1 minus top-2 logit after the repeat penalty, the closeness of each choice)."""
        L = self.L
        n_ctx = len(prompt) + max_new_tokens + 1
        ctx = self._context(n_ctx, capture=False)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        chain = self.sampler(**sampling)
        penalty, last_n = float(sampling.get("repeat_penalty", 1.0)), int(sampling.get("repeat_last_n", 64))
        try:
            for tok in prompt:            # llama-completion feeds the prompt to the penalties too
                L.llama_sampler_accept(chain, tok)
            self._decode(ctx, list(prompt), 0, "last")
            out: list[int] = []
            margins: list[float] = []
            history = list(prompt)
            for _ in range(max_new_tokens):
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).copy()
                margins.append(_margin(logits, history, penalty, last_n))
                tok = int(L.llama_sampler_sample(chain, ctx, -1))
                if stop_at_eos and self.is_eog(tok):
                    break
                out.append(tok)
                history.append(tok)
                self._decode(ctx, [tok], len(history) - 1, "last")
            return out, margins
        finally:
            L.llama_sampler_free(chain)


def _margin(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> float:
    """top-1 − top-2 logit after llama.cpp's repeat penalty over the last `last_n` tokens."""
    if penalty != 1.0 and last_n:
        ids = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
        v = logits[ids]
        logits[ids] = np.where(v > 0, v / penalty, v * penalty)
    top = np.partition(logits, -2)[-2:]
    return float(top.max() - top.min())


class LlamaCppTokenizer:
    """llama.cpp's tokenizer behind the small interface the corpus packer uses (`__call__`,
    bos/eos ids, special ids, a name), so the llama.cpp collector packs sequences with the same code."""

    def __init__(self, lm: LlamaCppModel):
        self.lm = lm
        self.bos_token_id = lm.bos()
        self.eos_token_id = lm.eos()
        self.all_special_ids = lm.special_ids()
        self.name_or_path = f"llama.cpp:{Path(lm.path).name}"

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        one = isinstance(texts, str)
        batch: list[str] = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.lm.tokenize(t, add_special=add_special_tokens) for t in batch]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return self.lm.detokenize([int(i) for i in ids if int(i) not in special])

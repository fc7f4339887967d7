"""Steering-vector files: `.safetensors` with metadata (the saeforge format), raw float32 `.npy` and
`.bin` (what `numpy.fromfile(path, dtype=numpy.float32)` reads), and llama.cpp control-vector GGUF.

llama.cpp control vectors (common/common.cpp `common_control_vector_load_one`, src/llama-adapter.cpp):
tensors `direction.{k}`, 1-D float32 [n_embd], k ≥ 1 (k = 0 is rejected). The loader puts
`direction.k` at data offset (k−1)·n_embd, which `llama_adapter_cvec::apply` copies into `tensors[k]`,
and the graph adds `tensors[il]` to the output of block `il` (0-based) right after its last residual
add (`cur = build_cvec(cur, il)` → "l_out"), at every position, times the `--control-vector-scaled`
strength. So our `layers.k.resid_post` is `direction.k`, and `layers.k.resid_pre` (= the output of
block k−1) is `direction.{k−1}`; block 0's output and anything inside a block cannot be expressed.
Metadata keys written: general.architecture = "controlvector", controlvector.model_hint,
controlvector.layer_count (llama.cpp ignores metadata; repeng and cvector-generator write the same).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from analysis.directions import SteeringVector
from saeforge.errors import UserError

FORMAT = "saeforge-steering/1"
_POINT_RE = re.compile(r"^layers\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$")


def _parent_ok(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise UserError(f"{flag} {str(path)!r}: folder {str(p.parent)!r} does not exist; create it first")
    return p


def save_safetensors(sv: SteeringVector, path: str | Path) -> Path:
    """One tensor per hook point (named by the hook point) + metadata (JSON-encoded strings)."""
    from safetensors.torch import save_file
    p = _parent_ok(path, "--save")
    meta = {"format": FORMAT, "layers": json.dumps(sv.points)}
    meta.update({k: json.dumps(v) for k, v in sv.meta.items()})
    save_file({k: v.detach().float().contiguous().cpu() for k, v in sv.directions.items()}, str(p), metadata=meta)
    return p


def load_safetensors(path: str | Path) -> SteeringVector:
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--load {str(path)!r} not found; pass a .safetensors file written by `saeforge steer --save`")
    with safe_open(str(p), framework="pt") as f:
        raw = f.metadata() or {}
        if raw.get("format") != FORMAT:
            raise UserError(f"--load {str(path)!r} is not a saeforge steering vector (metadata format "
                            f"{raw.get('format')!r}, expected {FORMAT!r})")
        order = json.loads(raw["layers"])
        dirs = {k: f.get_tensor(k) for k in order}
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if k in ("format", "layers"):
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return SteeringVector(dirs, meta)


def as_array(sv: SteeringVector, coeff: float = 1.0) -> np.ndarray:
    """float32 `coeff × direction`: `[d]` (or `[n_pos, d]`) for one hook point, `[n_points, d]` for several
    (in `sv.points` order)."""
    vs = [(coeff * v.detach().float().cpu()).numpy().astype(np.float32) for v in sv.directions.values()]
    if len(vs) == 1:
        return np.ascontiguousarray(vs[0])
    if any(v.ndim != 1 for v in vs):
        raise UserError("several hook points with per-position directions cannot be one array; save them one at a time")
    return np.ascontiguousarray(np.stack(vs))


def save_npy(sv: SteeringVector, path: str | Path, coeff: float = 1.0) -> Path:
    p = _parent_ok(path, "--npy")
    np.save(p, as_array(sv, coeff))
    return p


def save_bin(sv: SteeringVector, path: str | Path, coeff: float = 1.0) -> Path:
    """Raw little-endian float32, no header: `numpy.fromfile(path, dtype=numpy.float32).reshape(-1, d_model)`."""
    p = _parent_ok(path, "--bin")
    as_array(sv, coeff).astype("<f4").tofile(p)
    return p


def llama_cpp_index(point: str, n_layers: int) -> int:
    """The k of llama.cpp's `direction.k` that adds to the same residual stream as our hook point."""
    m = _POINT_RE.match(point)
    if not m or m.group(2) in ("attn_out", "mlp_out"):
        raise UserError(f"hook point {point!r} has no llama.cpp control-vector slot: llama.cpp adds to a block's "
                        f"output; steer layers.N.resid_post (N ≥ 1) or layers.N.resid_pre (N ≥ 2)")
    i = int(m.group(1))
    k = i if m.group(2) == "resid_post" else i - 1
    if not 1 <= k < n_layers:
        raise UserError(f"hook point {point!r} maps to llama.cpp direction.{k}, but llama.cpp only steers the "
                        f"outputs of blocks 1..{n_layers - 1}; pick a later layer")
    return k


def save_gguf(sv: SteeringVector, path: str | Path, n_layers: int, coeff: float = 1.0,
              model_hint: str | None = None, n_embd: int | None = None) -> Path:
    """A llama.cpp control vector holding coeff × direction (so `--control-vector FILE` at strength 1
    adds what `saeforge steer --coeff` added). Hook points sharing a slot are summed, as llama.cpp does.

    Checked before writing, because llama.cpp ignores what it cannot use without a word: the width must
    be the model's `n_embd`, and every slot must be one of blocks 1..n_layers−1."""
    import gguf
    p = _parent_ok(path, "--gguf")
    if n_embd is not None and sv.d_model != n_embd:
        raise UserError(f"--gguf {str(path)!r}: the direction has {sv.d_model} values but the model's n_embd is "
                        f"{n_embd}; llama.cpp would not apply it — build the direction on this model")
    if sv.per_position():
        raise UserError("llama.cpp control vectors add one vector at every position; a per-position ActAdd "
                        "direction cannot be exported: use --read last or --read mean")
    slots: dict[int, np.ndarray] = {}
    for point, v in sv.directions.items():
        k = llama_cpp_index(point, n_layers)
        arr = (coeff * v.detach().float().cpu()).numpy().astype(np.float32)
        slots[k] = slots[k] + arr if k in slots else arr
    w = gguf.GGUFWriter(str(p), arch="controlvector")
    w.add_string("controlvector.model_hint", model_hint or str(sv.meta.get("model_hint", sv.meta.get("model", ""))))
    w.add_int32("controlvector.layer_count", len(slots))
    for k in sorted(slots):
        w.add_tensor(f"direction.{k}", slots[k])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def load_gguf(path: str | Path) -> dict[int, np.ndarray]:
    """`{k: vector}` from a control-vector GGUF (for checks and round trips)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    return {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32).reshape(-1)
            for t in r.tensors if t.name.startswith("direction.")}

"""Steering-vector files: .safetensors metadata, .npy, raw .bin (numpy.fromfile) and llama.cpp GGUF."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.directions import SteeringVector
from analysis.steer_files import (
    llama_cpp_index,
    load_gguf,
    load_safetensors,
    save_bin,
    save_gguf,
    save_npy,
    save_safetensors,
)
from saeforge.errors import UserError

D = 16


def _sv(points=("layers.6.resid_post",), per_position=False) -> SteeringVector:
    g = torch.Generator().manual_seed(0)
    shape = (3, D) if per_position else (D,)
    return SteeringVector({p: torch.randn(shape, generator=g) for p in points},
                          {"source": "actadd:+['Love']-['Hate']", "source_point": "layers.4.resid_post",
                           "coeff": 4.0, "norm_scale": {"layers.6.resid_post": 103.6}, "model": "smollm2-135m"})


def test_safetensors_round_trip_keeps_directions_and_metadata(tmp_path):
    sv = _sv(("layers.6.resid_post", "layers.8.resid_post"))
    back = load_safetensors(save_safetensors(sv, tmp_path / "love.safetensors"))
    assert back.points == sv.points
    for p in sv.points:
        assert torch.equal(back.directions[p], sv.directions[p])
    assert back.meta["source"] == sv.meta["source"]
    assert back.meta["source_point"] == "layers.4.resid_post"
    assert back.meta["coeff"] == 4.0
    assert back.meta["norm_scale"] == {"layers.6.resid_post": 103.6}


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a saeforge steering vector"):
        load_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_npy_and_bin_hold_coeff_times_direction_as_float32(tmp_path):
    sv = _sv()
    v = sv.directions["layers.6.resid_post"].numpy()
    a = np.load(save_npy(sv, tmp_path / "v.npy", coeff=2.5))
    assert a.dtype == np.float32 and a.shape == (D,)
    np.testing.assert_allclose(a, 2.5 * v, rtol=1e-6)
    b = np.fromfile(save_bin(sv, tmp_path / "v.bin", coeff=2.5), dtype=np.float32)
    assert b.shape == (D,) and (tmp_path / "v.bin").stat().st_size == 4 * D
    np.testing.assert_array_equal(a, b)
    # several layers → [n_layers, d]; per-position → [n_pos, d]; .bin reshapes with (-1, d)
    two = _sv(("layers.6.resid_post", "layers.8.resid_post"))
    assert np.fromfile(save_bin(two, tmp_path / "two.bin"), dtype=np.float32).reshape(-1, D).shape == (2, D)
    pp = _sv(per_position=True)
    got = np.fromfile(save_bin(pp, tmp_path / "pp.bin"), dtype=np.float32).reshape(-1, D)
    np.testing.assert_array_equal(got, pp.directions["layers.6.resid_post"].numpy())


def test_llama_cpp_slot_mapping():
    # direction.k is added to the output of block k (0-based): our layers.k.resid_post
    assert llama_cpp_index("layers.6.resid_post", 30) == 6
    assert llama_cpp_index("layers.29.resid_post", 30) == 29
    assert llama_cpp_index("layers.7.resid_pre", 30) == 6      # input of block 7 = output of block 6
    with pytest.raises(UserError, match="direction.0"):
        llama_cpp_index("layers.0.resid_post", 30)
    with pytest.raises(UserError, match="direction.0"):
        llama_cpp_index("layers.1.resid_pre", 30)
    with pytest.raises(UserError, match="no llama.cpp control-vector slot"):
        llama_cpp_index("layers.6.mlp_out", 30)


def test_gguf_control_vector_reads_back_with_gguf_reader(tmp_path):
    import gguf
    sv = _sv(("layers.6.resid_post", "layers.9.resid_pre"))
    path = save_gguf(sv, tmp_path / "love.gguf", n_layers=30, coeff=4.0, model_hint="llama")
    r = gguf.GGUFReader(str(path))
    names = sorted(t.name for t in r.tensors)
    assert names == ["direction.6", "direction.8"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [D]
    fields = {f.name: f for f in r.fields.values()}

    def s(name):
        f = fields[name]
        return bytes(f.parts[f.data[0]]).decode()

    def i(name):
        f = fields[name]
        return int(f.parts[f.data[0]][0])
    assert s("general.architecture") == "controlvector"
    assert s("controlvector.model_hint") == "llama"
    assert i("controlvector.layer_count") == 2
    got = load_gguf(path)
    np.testing.assert_allclose(got[6], 4.0 * sv.directions["layers.6.resid_post"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[8], 4.0 * sv.directions["layers.9.resid_pre"].numpy(), rtol=1e-6)


def test_gguf_sums_points_sharing_a_slot_and_rejects_per_position(tmp_path):
    sv = _sv(("layers.6.resid_post", "layers.7.resid_pre"))
    got = load_gguf(save_gguf(sv, tmp_path / "sum.gguf", n_layers=30))
    assert list(got) == [6]
    np.testing.assert_allclose(got[6], sum(v.numpy() for v in sv.directions.values()), rtol=1e-6)
    with pytest.raises(UserError, match="per-position"):
        save_gguf(_sv(per_position=True), tmp_path / "pp.gguf", n_layers=30)

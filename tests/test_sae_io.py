"""The SAE directory format refuses what it cannot load faithfully, with one line each (issue 12)."""
from __future__ import annotations

import json

import pytest
import torch

from sae.architectures import ArchConfig, build_sae
from sae.io import load_sae, save_sae
from saeforge.errors import UserError


@pytest.fixture
def saved(tmp_path):
    sae = build_sae(ArchConfig(arch="topk", d_in=8, d_sae=32, k=4), generator=torch.Generator().manual_seed(0))
    return save_sae(sae, tmp_path / "sae", scale=0.5, meta={"hook_point": "layers.0.resid_post"}), sae


def _edit_cfg(d, fn):
    cfg = json.loads((d / "cfg.json").read_text())
    fn(cfg)
    (d / "cfg.json").write_text(json.dumps(cfg))


def test_round_trip_takes_raw_activations(saved):
    d, live = saved
    x = torch.randn(64, 8)
    loaded = load_sae(d)
    with torch.no_grad():  # saved with scale 0.5 folded in: raw x in, raw-unit x̂ out
        torch.testing.assert_close(loaded.decode(loaded.encode(x)) * 0.5, live.eval().decode(live.encode(x * 0.5)))


def test_missing_k_is_refused_not_zero(saved):
    d, _ = saved
    _edit_cfg(d, lambda c: (c.pop("arch_config"), c.pop("k")))
    with pytest.raises(UserError, match=r"does not record \['k'\]"):
        load_sae(d)


def test_unknown_fields_are_refused_not_dropped(saved):
    d, _ = saved
    _edit_cfg(d, lambda c: c["arch_config"].update(hierarchy_levels=[8, 24]))
    with pytest.raises(UserError, match=r"arch_config fields \['hierarchy_levels'\] that this saeforge does not know"):
        load_sae(d)
    _edit_cfg(d, lambda c: (c["arch_config"].pop("hierarchy_levels"), c["arch_config"].update(group_sizes=[8, 24])))
    with pytest.raises(UserError, match="arch_config is inconsistent"):  # a known field on the wrong architecture
        load_sae(d)


def test_corrupt_files_get_one_line(saved):
    d, _ = saved
    w = (d / "sae.safetensors").read_bytes()
    (d / "sae.safetensors").write_bytes(w[: len(w) // 2])
    with pytest.raises(UserError, match="cannot be read .* truncated or damaged"):
        load_sae(d)
    (d / "sae.safetensors").write_bytes(w)
    (d / "cfg.json").write_text('{"architecture": "topk", ')
    with pytest.raises(UserError, match="is not valid JSON"):
        load_sae(d)


def test_weights_that_disagree_with_cfg_are_refused(saved):
    d, _ = saved
    _edit_cfg(d, lambda c: (c["arch_config"].update(d_sae=64), c.update(d_sae=64)))
    with pytest.raises(UserError, match="holds tensors .* but cfg.json describes"):
        load_sae(d)


def test_not_an_sae_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not an SAE directory \\(a file"):
        load_sae(tmp_path / "f")
    with pytest.raises(UserError, match="is not an SAE directory \\(a directory without"):
        load_sae(tmp_path)

"""Alignment of SAE latents by decoder cosine."""
from __future__ import annotations

import pytest
import torch

from analysis.align import align
from saeforge.errors import UserError
from sae.architectures import ArchConfig, build_sae
from sae.io import save_sae


def test_permuted_copy_is_recovered():
    torch.manual_seed(0)
    W = torch.randn(300, 48)
    perm = torch.randperm(300)
    res = align(W, W[perm] * 3.0, threshold=0.7, block=64)  # scale does not matter
    assert res.share == 1.0 and res.share_b == 1.0 and res.mutual == 1.0
    # A latent i is B latent j where perm[j] == i
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(300)
    assert torch.equal(res.best_b, inv) and torch.equal(res.match_b, inv)
    torch.testing.assert_close(res.best_cos, torch.ones(300))


def test_unrelated_and_partial():
    torch.manual_seed(1)
    A, B = torch.randn(200, 64), torch.randn(200, 64)
    assert align(A, B).share == 0.0  # random 64-d directions are far from cosine 0.7
    mixed = torch.cat([A[:50] + 0.1 * torch.randn(50, 64), torch.randn(150, 64)])
    res = align(A, mixed, threshold=0.7, one_to_one="greedy")
    assert res.share == pytest.approx(0.25)
    assert torch.equal(res.match_b[:50], torch.arange(50))
    with pytest.raises(UserError, match="input widths"):
        align(A, torch.randn(10, 32))


def test_align_cli(tmp_path, capsys):
    """A permuted, sign-preserving copy: every latent finds its permuted partner at cosine 1 (in the JSON the
    CLI writes, not only in its printout); an unrelated random SAE shares almost no partners."""
    import json
    from analysis.align_cli import main
    torch.manual_seed(0)
    sae = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=64, k=4))
    b = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=64, k=4))
    unrelated = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=64, k=4))
    perm = torch.randperm(64)
    with torch.no_grad():
        b.W_dec.copy_(sae.W_dec[perm] * 2.0)  # sign kept, scale changed
    save_sae(sae, tmp_path / "a", meta={"hook_point": "layers.1.resid_post"})
    save_sae(b, tmp_path / "b", meta={"hook_point": "layers.1.resid_post"})
    save_sae(unrelated, tmp_path / "u", meta={"hook_point": "layers.1.resid_post"})
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m.json")]) == 0
    assert "cosine ≥ 0.7: 1.000" in capsys.readouterr().out
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    inv = torch.argsort(perm).tolist()  # A latent i is B latent inv[i]
    assert doc["best_b"] == inv and doc["match_b"] == inv
    assert doc["best_cos"] == pytest.approx([1.0] * 64, abs=1e-5) and doc["match_cos"] == pytest.approx([1.0] * 64, abs=1e-5)
    assert doc["share"] == doc["share_b"] == doc["mutual"] == doc["share_one_to_one"] == 1.0
    assert main([str(tmp_path / "a"), str(tmp_path / "u"), "--out", str(tmp_path / "u.json")]) == 0
    doc = json.loads((tmp_path / "u.json").read_text(encoding="utf-8"))
    assert doc["share"] <= 0.05 and doc["share_one_to_one"] <= 0.05
    assert max(doc["best_cos"]) < 0.9
    # a sign flip is not a match: the cosine is −1
    with torch.no_grad():
        b.W_dec.copy_(-sae.W_dec[perm])
    save_sae(b, tmp_path / "neg", meta={"hook_point": "layers.1.resid_post"})
    assert main([str(tmp_path / "a"), str(tmp_path / "neg"), "--out", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text(encoding="utf-8"))["share"] == 0.0

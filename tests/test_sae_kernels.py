"""Sparse TopK kernels equal the dense reference (forward and every gradient)."""
import pytest
import torch
import torch.nn.functional as F

from sae.architectures import ArchConfig, BatchTopKSAE, TopKSAE
from sae.sparse_ops import SparseCodes, sparse_decode, topk_autoencode


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense_topk_loss(x, enc, b_enc, W_dec, b_dec, k, mask=None):
    xc = x - b_dec
    pre = F.linear(xc, enc, b_enc)
    src = pre if mask is None else pre.masked_fill(~mask, float("-inf"))
    _, idx = src.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, idx, F.relu(pre.gather(1, idx)))
    return f @ W_dec + b_dec


def _params(d=12, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    return mk(9, d), mk(n, d), mk(n), mk(n, d), mk(d)


def test_sparse_decode_matches_dense_forward_and_grads():
    _, _, _, W, _ = _params()
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(9)])
    vals = torch.randn(9, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    codes = SparseCodes.from_topk(idx, vals, 40)
    out = sparse_decode(codes, W)
    dense = torch.zeros(9, 40, dtype=torch.float64).scatter(1, idx, vals) @ W
    assert torch.allclose(out, dense)
    gout = torch.randn_like(out)
    ga = torch.autograd.grad(out, (vals, W), gout)
    gb = torch.autograd.grad(dense, (vals, W), gout)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b)


def test_topk_encode_decode_grads_match_dense():
    x, enc, b_enc, W, b_dec = _params()
    k = 6
    codes, recon, _ = topk_autoencode(x - b_dec, enc, b_enc, W, k)
    out = recon + b_dec
    ref = _dense_topk_loss(x, enc, b_enc, W, b_dec, k)
    assert torch.allclose(out, ref)
    _assert_same_grads(out, ref, (enc, b_enc, W, b_dec, x))



def test_centre_gradient_equals_the_summed_input_gradient():
    """With `centre` (xc = x − centre, x constant) the kernel returns the centre's gradient as one
    matrix-vector product; it equals the dense reference, as does every other gradient."""
    x, enc, b_enc, W, b_dec = _params(seed=5)
    x = x.detach()
    codes, recon, _ = topk_autoencode((x - b_dec).detach(), enc, b_enc, W, 6, centre=b_dec)
    out = recon + b_dec
    ref = _dense_topk_loss(x, enc, b_enc, W, b_dec, 6)
    assert torch.allclose(out, ref)
    _assert_same_grads(out, ref, (enc, b_enc, W, b_dec))


def _assert_same_grads(out: torch.Tensor, ref: torch.Tensor, params: tuple) -> None:
    """Backpropagating one random cotangent through both gives the same gradient for every input."""
    gout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, gout), torch.autograd.grad(ref, params, gout)):
        assert torch.allclose(a, b, atol=1e-10)


def test_masked_topk_grads_match_dense():
    x, enc, b_enc, W, b_dec = _params(seed=3)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::3] = True
    codes, out, _ = topk_autoencode(x - b_dec, enc, b_enc, W, 4, mask=mask)
    assert mask[codes.cols].all()
    ref = _dense_topk_loss(x, enc, b_enc, W, b_dec, 4, mask) - b_dec
    assert torch.allclose(out, ref)
    _assert_same_grads(out, ref, (enc, b_enc, W, b_dec, x))


def test_topk_sae_forward_equals_encode_decode_and_dense_grads():
    torch.manual_seed(0)
    sae = TopKSAE(ArchConfig("topk", d_in=16, d_sae=64, k=5)).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    out = sae(x)
    assert torch.allclose(out.recon, sae.decode(sae.encode(x)))
    assert torch.allclose(out.latents.dense(), sae.encode(x))
    g_sparse = torch.autograd.grad(out.loss, list(sae.parameters()))
    f = sae.encode(x)
    ref_recon = f @ sae.W_dec + sae.b_dec
    ref = (ref_recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    g_dense = torch.autograd.grad(ref, list(sae.parameters()))
    for a, b in zip(g_sparse, g_dense):
        assert torch.allclose(a, b, atol=1e-10)


def test_batchtopk_uses_batch_budget_and_dense_grads():
    torch.manual_seed(0)
    sae = BatchTopKSAE(ArchConfig("batchtopk", d_in=16, d_sae=64, k=4)).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    out = sae(x)
    dense = out.latents.dense()
    assert int((dense > 0).sum()) == 40
    pre = torch.relu(sae.pre_acts(x))
    thr = pre.reshape(-1).topk(40).values[-1]
    assert torch.allclose(dense, pre * (pre >= thr))
    ref = ((dense @ sae.W_dec + sae.b_dec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    # dense reference with the same selection
    mask = (pre >= thr).double()
    pre_g = torch.relu(sae.pre_acts(x)) * mask
    ref = ((pre_g @ sae.W_dec + sae.b_dec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    ps = list(sae.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, ps), torch.autograd.grad(ref, ps)):
        assert torch.allclose(a, b, atol=1e-10)
    assert float(sae.threshold[0]) > 0


def test_kernels_with_float32_and_repeated_latents():
    """float32 (the training dtype) and latents shared by many rows, as after training."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 24, generator=g)
    enc = torch.randn(48, 24, generator=g)
    enc[:4] *= 5  # a few latents win in most rows
    enc.requires_grad_(True)
    W = torch.randn(48, 24, generator=g, requires_grad=True)
    b_enc = torch.zeros(48, requires_grad=True)
    b_dec = torch.randn(24, generator=g, requires_grad=True)
    codes, recon, _ = topk_autoencode(x - b_dec, enc, b_enc, W, 6)
    ref = _dense_topk_loss(x, enc, b_enc, W, b_dec, 6) - b_dec
    assert torch.allclose(recon, ref, atol=1e-5)
    ps = (enc, b_enc, W, b_dec)
    gout = torch.randn_like(recon)
    for a, b in zip(torch.autograd.grad(recon, ps, gout), torch.autograd.grad(ref, ps, gout)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_auxk_dense_and_sparse_paths_agree_with_reference():
    """AuxK decodes the top k_aux dead latents (no b_dec), by either path, with matching grads."""
    from sae.architectures import _aux_decode
    torch.manual_seed(0)
    sae = TopKSAE(ArchConfig("topk", d_in=12, d_sae=60, k=3)).double()
    x = torch.randn(16, 12, dtype=torch.float64)
    xc = x - sae.b_dec
    pre = torch.addmm(sae.b_enc, xc, sae.enc.t()).detach()
    for n_dead, k_aux in ((40, 5), (8, 6), (8, 8)):  # sparse path, dense subset path, all dead picked
        dead = torch.zeros(60, dtype=torch.bool)
        dead[torch.randperm(60)[:n_dead]] = True
        got = _aux_decode(sae, x, xc, pre, dead, k_aux)
        ref = _dense_topk_loss(x, sae.enc, sae.b_enc, sae.W_dec, sae.b_dec, k_aux, dead) - sae.b_dec
        assert torch.allclose(got, ref, atol=1e-10)
        ps = list(sae.parameters())
        gout = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, ps, gout, allow_unused=True),
                        torch.autograd.grad(ref, ps, gout, allow_unused=True)):
            a = a.to_dense() if a is not None and a.is_sparse else a  # the dense path's row gradients are sparse
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-10)


def test_training_step_with_few_dead_latents_leaves_dense_gradients_equal_to_the_reference():
    """AuxK's dense-subset path gives sparse row gradients; added to the main term's, every parameter
    ends with a dense gradient equal to that of the loss written densely (what the optimizer steps on)."""
    torch.manual_seed(0)
    sae = TopKSAE(ArchConfig("topk", d_in=12, d_sae=60, k=3, aux_coef=0.5)).double()
    x = torch.randn(32, 12, dtype=torch.float64)
    dead = torch.zeros(60, dtype=torch.bool)
    dead[:6] = True  # k_aux = 6 of 6 dead: the dense-subset path
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    got = [p.grad for p in sae.parameters()]
    assert all(g.layout == torch.strided for g in got)
    sae.zero_grad()
    var = (x - x.mean(0)).pow(2).sum()
    recon = _dense_topk_loss(x, sae.enc, sae.b_enc, sae.W_dec, sae.b_dec, 3)
    e_hat = _dense_topk_loss(x, sae.enc, sae.b_enc, sae.W_dec, sae.b_dec, 6, dead) - sae.b_dec
    ref = (recon - x).pow(2).sum() / var + 0.5 * (e_hat - (x - recon).detach()).pow(2).sum() / var
    assert torch.allclose(out.loss, ref)
    for a, b in zip(got, torch.autograd.grad(ref, list(sae.parameters()))):
        assert torch.allclose(a, b, atol=1e-10)

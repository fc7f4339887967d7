"""Latent-sharded TopK (sae/sharded.py) with 2 gloo ranks on CPU: after 20 steps on store rows (AuxK
included) the gathered SAE equals a single-process TopKSAE trained with the trainer's step, and each
rank holds about half the parameter + optimizer memory."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sae.architectures import ArchConfig, build_sae
from sae.optim import TrainOptimizer
from sae.synthetic import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = ArchConfig(arch="topk", d_in=16, d_sae=128, k=4)
STEPS, BATCH, LR, CLIP, DEAD_AFTER = 20, 256, 3e-3, 1.0, 1024  # latents die within the run: AuxK engages
# the sharded run sums the same fp32 products in another order (two partial decodings + all_reduce);
# Adam carries that rounding through 20 steps: 1e-5 fails a wrong shard, selection or gradient (≥1e-3)
ATOL = 1e-5


def _init():
    return build_sae(CFG, b_dec=torch.zeros(CFG.d_in), generator=torch.Generator().manual_seed(0)).train()


def _batches(path):
    from collect.store import Store
    st = Store.open(path)
    rows = torch.from_numpy(st.activations(st.hooks[0], 0, STEPS * BATCH))
    return rows.view(STEPS, BATCH, -1) / rows.pow(2).sum(1).mean().sqrt()


def _state_bytes(params, opt):
    state = [t for s in opt.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in list(params) + state)


def _single(path):
    """What sae.trainer does per step for one TopK SAE (CPU AuxK path, dead-latent counter)."""
    sae = _init()
    opt = TrainOptimizer("adam", list(sae.named_parameters()), LR)
    since = torch.zeros(CFG.d_sae, dtype=torch.int64)
    n_aux = 0
    for x in _batches(path):
        out = sae(x, dead_mask=since >= DEAD_AFTER)
        out.loss.backward()
        n_aux += int(out.terms["aux"] > 0)
        sae.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), CLIP)
        opt.step()
        sae.normalize_decoder()
        since += len(x)
        since.masked_fill_(out.fire_counts > 0, 0)
    return sae.state_dict(), _state_bytes(sae.parameters(), opt), n_aux


def _worker(rank, port, path, out):
    import torch.distributed as dist

    from sae.sharded import ShardedTopK
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = ShardedTopK.from_full(_init(), rank, 2)
    opt = TrainOptimizer("adam", list(m.named_parameters()), LR)
    losses = []
    since = torch.zeros(m.n_local, dtype=torch.int64)
    for x in _batches(path):
        res = m(x, dead_mask=since >= DEAD_AFTER)
        loss, fired = res.loss, res.fire_counts
        loss.backward()
        m.project_decoder_grad()
        m.clip_grad_norm_(CLIP)
        opt.step()
        m.normalize_decoder()
        since += len(x)
        since.masked_fill_(fired > 0, 0)
        losses.append(float(loss.detach()))
    full = m.full_state()
    if rank == 0:
        torch.save({"state": full, "bytes": _state_bytes(m.parameters(), opt), "losses": losses}, out)
    dist.destroy_process_group()


def test_two_shards_train_the_single_process_sae(tmp_path):
    store = write_synthetic_store(str(tmp_path / "s.zarr"), n_tokens=8192, d=16, n_features=64, active=3,
                                  context=64, shard_rows=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, store.path, str(tmp_path / "r0.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "r0.pt", weights_only=True)
    ref, ref_bytes, n_aux = _single(store.path)
    assert n_aux >= 5  # AuxK was part of the compared steps
    assert got["losses"][-1] < 0.8 * got["losses"][0]  # it learned (0.78 -> 0.53 FVU here)
    for k in ref:
        diff = float((ref[k] - got["state"][k]).abs().max())
        assert diff < ATOL, (k, diff)
    # each rank: half of enc, b_enc, W_dec and their Adam moments, plus the replicated b_dec
    assert 0.45 < got["bytes"] / ref_bytes < 0.55, (got["bytes"], ref_bytes)


def test_shard_count_must_divide_the_dictionary():
    from sae.sharded import ShardedTopK
    from saeforge.errors import UserError
    with pytest.raises(UserError, match="does not divide the dictionary"):
        ShardedTopK(ArchConfig(arch="topk", d_in=16, d_sae=100, k=4), 0, 3)
    with pytest.raises(UserError, match="supports --arch topk"):
        ShardedTopK(ArchConfig(arch="relu", d_in=16, d_sae=128), 0, 2)

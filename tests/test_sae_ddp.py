"""Data-parallel training with 2 gloo ranks on CPU equals single-process training on the same
global batches; an interrupt on one rank checkpoints and --resume under DDP continues exactly.
The runs use --data-lanes 2, so each rank reads only the chunks of its half of every batch."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sae.io import load_sae
from sae.synthetic import write_synthetic_store
from sae.trainer import train
from tests.ddp_helpers import free_port, torchrun_train, train_args, train_cfg

ARCHS = ["topk", "relu", "jumprelu"]  # batchtopk selects per rank under DDP (sae/distributed.py)
# The DDP run sums the same fp32 terms in a different order (two half-batch sums + all_reduce, the
# variance in float64) and Adam carries that rounding through 20 steps: measured max |Δw| 5e-7 on
# this store, so 1e-5 leaves 20× room while a real mismatch (a wrong slice or variance: ≥1e-3) fails.
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("ddp") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _same(a_dir, b_dir):
    for arch in ARCHS:
        name = f"{arch}_k3_x4" if arch == "topk" else f"{arch}_x4"
        a, b = load_sae(Path(a_dir) / name).state_dict(), load_sae(Path(b_dir) / name).state_dict()
        for k in a:
            diff = float((a[k] - b[k]).abs().max())
            assert diff < ATOL, (name, k, diff)


@pytest.fixture(scope="module")
def single(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    train(train_cfg(store, out, ARCHS))
    return out


def test_torchrun_two_ranks_match_single_process(store, single, tmp_path):
    p = torchrun_train(2, train_args(store, tmp_path / "ddp", ARCHS), tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    _same(single, tmp_path / "ddp")
    assert (tmp_path / "ddp" / "topk_k3_x4" / "eval.json").is_file()


def _worker(rank, port, store_path, out, stop_at):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from collect.store import Store
    st = Store.open(store_path)

    def on_step(t):
        if stop_at and rank == 1 and t.step == stop_at:  # one rank is told to stop: all stop there
            t.request_stop()

    res = train(train_cfg(st, out, ARCHS, resume=not stop_at), on_step=on_step)
    assert res.interrupted == bool(stop_at)
    torch.distributed.destroy_process_group()


def test_ddp_interrupt_and_resume_is_exact(store, single, tmp_path):
    out = tmp_path / "cut"
    mp.spawn(_worker, args=(free_port(), store.path, str(out), 7), nprocs=2, join=True)
    assert (out / "checkpoint.pt").is_file() and not (out / "topk_k3_x4").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 7
    mp.spawn(_worker, args=(free_port(), store.path, str(out), 0), nprocs=2, join=True)
    assert not (out / "checkpoint.pt").exists()
    _same(single, out)


def test_batch_must_split_evenly(store, tmp_path, monkeypatch):
    from sae.loader import ShuffledLoader
    from saeforge.errors import UserError
    with pytest.raises(UserError, match="multiple of the number of ranks"):
        ShuffledLoader(store, store.hooks[0], 255, rank=0, world=2)
    a = [next(iter(ShuffledLoader(store, store.hooks[0], 256, rank=r, world=2))) for r in (0, 1)]
    whole = next(iter(ShuffledLoader(store, store.hooks[0], 256)))
    assert torch.equal(torch.cat(a), whole)


def test_torchrun_two_ranks_match_single_process_for_a_skip_transcoder(tmp_path):
    """A skip-transcoder (two hook points per row, per-hook scales, b_in, W_skip, the target's global
    variance) trains the same weights on 2 gloo ranks as in one process."""
    from sae.synthetic import planted_dictionary, planted_rows
    dx, ox = planted_dictionary(16, 32, seed=1)
    dy, oy = planted_dictionary(16, 32, seed=2)
    x, y = planted_rows(8192, [dx, dy], [ox, oy], active=3)
    st = write_synthetic_store(str(tmp_path / "t.zarr"), n_tokens=8192, d=16, context=64, shard_rows=1024,
                               rows={"layers.0.mlp_in": x, "layers.0.mlp_out": y})
    kw = dict(hook="layers.0.mlp_in", target="layers.0.mlp_out", skip=True)
    train(train_cfg(st, tmp_path / "one", ["topk"], **kw))
    args = train_args(st, tmp_path / "ddp", ["topk"])
    p = torchrun_train(2, [*args, "--hook", kw["hook"], "--target", kw["target"], "--skip"], tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_sae(tmp_path / "one").state_dict(), load_sae(tmp_path / "ddp").state_dict()
    assert "W_skip" in a and float(a["W_skip"].abs().max()) > 0
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff < ATOL, (k, diff)


def test_each_rank_reads_only_its_half(store):
    """With --data-lanes 2 the two ranks' slices are the single-process batches and each rank reads
    half the bytes; without lanes every rank reads all of them (and discards half)."""
    import itertools
    from sae.loader import ShuffledLoader
    hook, n = store.hooks[0], 200  # 200 batches: many epochs, so prefetch-ahead is a small slack

    def run(**kw):
        ld = ShuffledLoader(store, hook, 256, seed=5, buffer_rows=512, **kw)
        return list(itertools.islice(iter(ld), n)), ld.bytes_read

    one, b_one = run(lanes=2)
    (r0, b0), (r1, b1) = run(lanes=2, rank=0, world=2), run(lanes=2, rank=1, world=2)
    assert all(torch.equal(a, torch.cat([x, y])) for a, x, y in zip(one, r0, r1))
    # the ranks' reads partition the single process's (a lane with fewer training rows per chunk
    # cycles faster, so the halves differ a little: 43/57 on this store)
    assert abs((b0 + b1) / b_one - 1) < 0.02 and max(b0, b1) / b_one < 0.62, (b_one, b0, b1)
    _, b_whole = run(rank=0, world=2)  # one lane: the rank reads every chunk
    assert b_whole / b_one > 0.95

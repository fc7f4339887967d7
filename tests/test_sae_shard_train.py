"""`saeforge train --shard-latents N` under torchrun (gloo, CPU): the latent-sharded run — alone and on
a 2 × 2 mesh with data parallelism — saves one ordinary SAE directory whose weights equal the
single-process run's; an interrupt checkpoints one file per shard and --resume continues exactly;
bad rank counts are refused with one line."""
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from sae.io import load_sae
from sae.synthetic import write_synthetic_store
from sae.trainer import train
from tests.ddp_helpers import free_port, torchrun_train, train_args, train_cfg

# Two partial decodings summed by all_reduce (and, on the 2 × 2 mesh, the variance in float64 and the
# gradient average) change the float order; measured max |Δw| after 20 steps is ~1e-6 here, while a
# wrong shard, selection or gradient moves weights by ≥ 1e-3.
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("shard") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _same(a_dir, b_dir):
    a, b = load_sae(a_dir).state_dict(), load_sae(b_dir).state_dict()
    assert set(a) == set(b)
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff < ATOL, (k, diff)


@pytest.fixture(scope="module")
def single(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    res = train(train_cfg(store, out, ["topk"]))
    assert res.metrics["topk_k3_x4"]["dead_fraction"] > 0 or res.metrics["topk_k3_x4"]["heldout_fvu"] < 1
    return out


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_torchrun_latent_sharded_matches_single_process(store, single, tmp_path, ranks):
    """2 ranks: 2 shards; 4 ranks: a 2 × 2 mesh (2 data-parallel ranks, each batch half, × 2 shards)."""
    p = torchrun_train(ranks, [*train_args(store, tmp_path / "sh", ["topk"]), "--shard-latents", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _same(single, tmp_path / "sh")  # one ordinary SAE directory, loaded by the ordinary loader
    assert (tmp_path / "sh" / "eval.json").is_file()
    assert not list((tmp_path / "sh").glob("checkpoint*"))


def _worker(rank, port, store_path, out, stop_at, world):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from collect.store import Store
    st = Store.open(store_path)

    def on_step(t):
        if stop_at and rank == 1 and t.step == stop_at:  # one rank is told to stop: all stop there
            t.request_stop()

    try:
        res = train(train_cfg(st, out, ["topk"], resume=not stop_at, shard_latents=2), on_step=on_step)
        assert res.interrupted == bool(stop_at)
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_interrupt_and_resume_is_exact(store, single, tmp_path):
    out = tmp_path / "cut"
    mp.spawn(_worker, args=(free_port(), store.path, str(out), 7, 2), nprocs=2, join=True)
    assert (out / "checkpoint.pt").is_file() and (out / "checkpoint.shard1.step7.pt").is_file()
    assert not (out / "sae.safetensors").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["shards"], ck["world"]) == (7, 2, 2)
    assert ck["members"][0]["sae"]["enc"].shape[0] == 32  # shard 0 holds half of the 64 latents

    # a sharded checkpoint resumed with another rank count is refused, and nothing is overwritten
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    torch.save({**ck, "world": 4, "config": {**ck["config"], "out": str(bad)}}, bad / "checkpoint.pt")
    before = (bad / "checkpoint.shard1.step7.pt").read_bytes()
    with pytest.raises(Exception, match="latent-sharded over 4 ranks"):
        mp.spawn(_worker, args=(free_port(), store.path, str(bad), 0, 2), nprocs=2, join=True)
    assert (bad / "checkpoint.shard1.step7.pt").read_bytes() == before

    mp.spawn(_worker, args=(free_port(), store.path, str(out), 0, 2), nprocs=2, join=True)
    assert not list(out.glob("checkpoint*"))
    _same(single, out)


@pytest.mark.parametrize("args, msg", [
    (["--shard-latents", "2"], "needs a multiple of 2 ranks under torchrun (this run has 1)"),
    (["--shard-latents", "2", "--arch", "relu"], "--shard-latents splits TopK autoencoders"),
    (["--shard-latents", "0"], "must be a positive number of ranks"),
])
def test_bad_shard_settings_are_one_line_exit_2(store, tmp_path, capsys, args, msg):
    from saeforge.cli import dispatch
    code = dispatch(["train", *train_args(store, tmp_path / "o", ["topk"]), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_shard_count_that_does_not_divide_d_sae_is_refused(tmp_path):
    st = write_synthetic_store(str(tmp_path / "odd.zarr"), n_tokens=2048, d=15, n_features=30, active=3,
                               context=64, shard_rows=1024)
    args = train_args(st, tmp_path / "o", ["topk"])
    args[args.index("--expansion") + 1] = "1"  # d_sae 15
    p = torchrun_train(2, [*args, "--shard-latents", "2"], tmp_path)
    assert p.returncode != 0 and "exitcode: 2" in p.stderr, p.stderr[-2000:]  # torchrun exits 1 for a rank's 2
    assert "--shard-latents 2 does not divide the dictionary (15 latents" in p.stderr
    assert not (tmp_path / "o").exists()

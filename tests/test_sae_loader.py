"""The shuffled loader: only training rows, each once per epoch, order a pure function of seed+position."""
import itertools

import numpy as np
import pytest

from saeforge.errors import UserError
from sae.loader import ShuffledLoader, heldout_rows
from sae.synthetic import write_synthetic_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, D = 6144, 8


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    """Rows whose first value is their row index, so every yielded row can be traced back."""
    rows = np.zeros((N, D), dtype=np.float32)
    rows[:, 0] = np.arange(N)
    rows[:, 1:] = np.random.default_rng(0).standard_normal((N, D - 1))
    return write_synthetic_store(str(tmp_path_factory.mktemp("ids") / "s.zarr"), n_tokens=N, d=D, rows=rows,
                                 context=32, shard_rows=512)


def _ids(batches):
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


def test_only_training_rows_each_once_per_epoch(id_store):
    train = id_store.split_mask("train")
    n_train = int(train.sum())
    assert 0 < n_train < N
    loader = ShuffledLoader(id_store, "layers.0.resid_post", batch_size=128, seed=3, buffer_rows=1024)
    ids = _ids(itertools.islice(iter(loader), (2 * n_train) // 128))
    assert train[ids].all(), "yielded a held-out or keep=False row"
    assert not id_store.heldout()[ids].any() and id_store.keep()[ids].all()
    first = ids[:n_train]
    assert len(np.unique(first)) == n_train  # one epoch = every training row exactly once
    assert not np.array_equal(first, np.sort(first))  # shuffled
    assert abs(np.corrcoef(np.arange(n_train), first)[0, 1]) < 0.5  # mixed across the store


def test_order_is_function_of_seed_and_position(id_store):
    hook = "layers.0.resid_post"
    full = _ids(itertools.islice(iter(ShuffledLoader(id_store, hook, 96, seed=1, buffer_rows=1024)), 80))
    resumed = _ids(itertools.islice(iter(ShuffledLoader(id_store, hook, 96, seed=1, position=96 * 37,
                                                        buffer_rows=1024)), 43))
    assert np.array_equal(full[96 * 37:], resumed)
    other = _ids(itertools.islice(iter(ShuffledLoader(id_store, hook, 96, seed=2, buffer_rows=1024)), 10))
    assert not np.array_equal(full[:960], other)


def test_heldout_rows_are_heldout(id_store):
    ids = heldout_rows(id_store, "layers.0.resid_post", 500)[:, 0].astype(np.int64)
    assert len(ids) == 500 and id_store.split_mask("heldout")[ids].all()


def test_loader_errors(id_store, tmp_path):
    with pytest.raises(UserError, match="layers.9.mlp_out"):
        ShuffledLoader(id_store, "layers.9.mlp_out", 128)
    with pytest.raises(UserError, match="fewer than one batch"):
        ShuffledLoader(id_store, "layers.0.resid_post", 100_000)
    rows = np.ones((1024, 4), dtype=np.float32)
    rows[700, 2] = np.nan
    st = write_synthetic_store(str(tmp_path / "nan.zarr"), n_tokens=1024, d=4, rows=rows, context=32, shard_rows=256)
    with pytest.raises(UserError, match="NaN"):
        next(iter(ShuffledLoader(st, "layers.0.resid_post", 64, buffer_rows=4096)))

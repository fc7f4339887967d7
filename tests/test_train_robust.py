"""The trainer under hostile conditions (issue 12): bad outputs and values refused before any work,
one run per --out, a SIGTERM during the final evaluation, and a store without held-out rows."""
from __future__ import annotations

import os
import signal
import time

import pytest

from sae.config import TrainConfig
from sae.io import load_sae
from sae.synthetic import write_synthetic_store
from sae.trainer import Trainer, train
from saeforge.cli import dispatch
from saeforge.errors import UserError
from saeforge.locks import exclusive

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("rb") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _cfg(store, out, **kw):
    base = dict(store=store.path, out=str(out), k=[3], expansion=[4], tokens=256 * 8, batch_size=256,
                wandb="disabled", quiet=True, eval_every=0, checkpoint_every=0, scale_sample=2048, eval_rows=512)
    base.update(kw)
    return TrainConfig(**base)


def test_an_existing_file_as_out_fails_before_training(store, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="is an existing file, not a directory"):
        Trainer(_cfg(store, f))
    assert time.perf_counter() - t0 < 2


def test_k_larger_than_the_dictionary_is_one_line(store, tmp_path):
    with pytest.raises(UserError, match="--k 100 is larger than the dictionary \\(64 latents"):
        Trainer(_cfg(store, tmp_path / "o", k=[100]))


def test_a_second_run_on_one_out_is_refused(store, tmp_path):
    out = tmp_path / "o"
    with exclusive(str(out), "SAE output"):
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            train(_cfg(store, out))
    assert train(_cfg(store, out)).out_dirs  # the lock is gone with its holder


def test_sigterm_during_the_final_evaluation_leaves_whole_outputs(store, tmp_path, monkeypatch):
    """Before: the handlers were restored after the loop, so SIGTERM here killed the process (-15)."""
    real = Trainer._evaluate

    def evaluate_then_sigterm(self, logger, heldout, final=False):
        res = real(self, logger, heldout, final)
        if final:
            os.kill(os.getpid(), signal.SIGTERM)
        return res
    monkeypatch.setattr(Trainer, "_evaluate", evaluate_then_sigterm)
    out = tmp_path / "o"
    res = train(_cfg(store, out))
    assert not res.interrupted and res.out_dirs == [out]
    assert load_sae(out).cfg.d_sae == 64 and not (out / "checkpoint.pt").exists()
    assert not (out / "eval.json").exists()  # the long part was skipped, as the log says
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_store_without_heldout_rows_says_why(tmp_path, capsys):
    no_held = write_synthetic_store(str(tmp_path / "nh.zarr"), n_tokens=4096, d=16, n_features=64, active=3,
                                    context=64, shard_rows=1024, heldout_every=10**6)
    rc = dispatch(["train", "--store", no_held.path, "--out", str(tmp_path / "o"), "--k", "3", "--expansion", "4",
                   "--tokens", "2048", "--batch-size", "256", "--wandb", "disabled", "--quiet", "--scale-sample", "1024"])
    out = capsys.readouterr().out
    assert rc == 0 and "nan" not in out.lower()
    assert "the store has no held-out rows" in out and "--heldout-fraction" in out

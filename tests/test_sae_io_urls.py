"""SAE directories and checkpoints on fsspec URLs (memory://, file://), and the trainer's final
evaluation (eval.json, wandb run id in cfg.json)."""
import json

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from sae.config import TrainConfig
from sae.io import load_sae, read_cfg
from sae.synthetic import write_synthetic_store
from sae.trainer import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("urls") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _cfg(store, out, **kw):
    base = dict(store=store.path, out=str(out), k=[3], expansion=[4], tokens=256 * 12, batch_size=256,
                wandb="disabled", quiet=True, eval_every=5, lr=[3e-3], checkpoint_every=0, scale_sample=2048,
                eval_rows=512)
    base.update(kw)
    return TrainConfig(**base)


def test_train_to_memory_url_equals_local(store, tmp_path):
    fs = fsspec.filesystem("memory")
    res = train(_cfg(store, "memory://saeforge-test/sae"))
    assert res.out_dirs == ["memory://saeforge-test/sae"]
    assert {p.rsplit("/", 1)[-1] for p in fs.ls("/saeforge-test/sae", detail=False)} == \
        {"sae.safetensors", "cfg.json", "eval.json"}
    train(_cfg(store, tmp_path / "local"))
    remote, local = load_sae("memory://saeforge-test/sae"), load_sae(tmp_path / "local")
    for (n, a), (_, b) in zip(remote.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), n
    assert read_cfg("memory://saeforge-test/sae")["d_sae"] == 64
    # file:// URLs are local paths
    d = train(_cfg(store, f"file://{tmp_path}/viafile")).out_dirs[0]
    assert (tmp_path / "viafile" / "sae.safetensors").is_file()
    for (n, a), (_, b) in zip(load_sae(d).state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), n
    # `saeforge eval` on the URL writes eval.json beside the SAE on the URL, not a local "memory:/…" path
    from saeforge.cli import dispatch
    fs.rm_file("/saeforge-test/sae/eval.json")
    assert dispatch(["eval", "memory://saeforge-test/sae", "--store", store.path, "--ce-tokens", "0",
                     "--bootstrap", "0", "--wandb", "disabled", "--quiet"]) == 0  # 16 held-out sequences
    assert json.loads(fs.cat_file("/saeforge-test/sae/eval.json"))["metrics"]["n_rows"] > 0
    fs.rm("/saeforge-test", recursive=True)


def test_checkpoint_and_resume_on_memory_url(store, tmp_path):
    import os
    import signal
    fs = fsspec.filesystem("memory")
    url = "memory://saeforge-ck/run"

    def interrupt(t):
        if t.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(_cfg(store, url), on_step=interrupt).interrupted
    assert fs.isfile("/saeforge-ck/run/checkpoint.pt")
    train(_cfg(store, url, resume=True))
    assert not fs.isfile("/saeforge-ck/run/checkpoint.pt")
    train(_cfg(store, tmp_path / "full"))
    a, b = load_sae(url).state_dict(), load_sae(tmp_path / "full").state_dict()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=0), n
    fs.rm("/saeforge-ck", recursive=True)


def test_final_eval_and_wandb_run_recorded(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train(_cfg(store, tmp_path / "o", wandb="offline"))
    cfg = json.loads((tmp_path / "o" / "cfg.json").read_text())
    assert cfg["wandb_run_id"] and cfg["wandb_project"] == "saeforge" and cfg["wandb_dir"] == str(tmp_path)
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())["metrics"]
    fm = res.metrics[next(iter(res.metrics))]
    assert ev["n_rows"] == fm["heldout_n_rows"] == 512
    assert ev["fvu"] == pytest.approx(fm["heldout_fvu"], rel=1e-4)  # same rows, live vs folded SAE
    # per-element MSE and the per-token squared error (the old heldout_mse) are both reported
    assert fm["heldout_sq_err_per_token"] == pytest.approx(fm["heldout_mse"] * 16, rel=1e-6)
    assert 0 < fm["heldout_fvu"] < 1 and "heldout_cossim" in fm
    assert load_file(tmp_path / "o" / "sae.safetensors")["W_dec"].shape == (64, 16)

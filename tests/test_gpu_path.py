"""The GPU path, checked on CPU: a training step makes no host-synchronising call when the
sync-free variants are on (what CUDA takes), those variants compute the same loss and gradients,
bf16 autocast trains with float32 weights, and `--device cuda` without CUDA is one line, exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sae.architectures as archs
import sae.sparse_ops as sops
from saeforge.cli import dispatch
from sae.architectures import ArchConfig, build_sae
from sae.config import TrainConfig
from sae.io import load_sae
from sae.synthetic import write_synthetic_store
from sae.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# aten ops that copy a value to the host (a CUDA sync) or size their output by the data
_SYNCING = {"_local_scalar_dense", "nonzero", "argwhere", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "bincount"}


class SyncCounter(TorchDispatchMode):
    """Records every aten op in the block (backward included) that would synchronise with a CUDA
    device: .item()/bool()/int()/float() (all `_local_scalar_dense`), data-sized outputs, and
    boolean-mask indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.seen.add(name)
        if name in _SYNCING:
            self.calls.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size", args[2] if len(args) > 2 else None) is None:
            self.calls.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in (args[1] or []) if a is not None):
            self.calls.append(f"{name}[bool]")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("gpu") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


@pytest.fixture
def as_on_cuda(monkeypatch):
    """Take the branches a CUDA tensor takes (sync-free AuxK and masked choice) on CPU."""
    for mod in (sops, archs):
        monkeypatch.setattr(mod, "sync_free", lambda t: True)


def _trainer(store, tmp_path, **kw) -> Trainer:
    cfg = TrainConfig(**{**dict(store=store.path, out=str(tmp_path / "o"), arch=["topk"], k=[3], expansion=[4],
                                tokens=256 * 20, batch_size=256, dead_tokens=512, scale_sample=2048, eval_rows=256,
                                checkpoint_every=0, wandb="disabled", quiet=True, threads=1), **kw})
    cfg.validate()
    t = Trainer(cfg)
    t._init_fresh()
    return t


def _steps(t: Trainer, n: int, seed: int = 0) -> SyncCounter:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(t.store.activations(t.cfg.hook, 0, 4096)) * t.scale
    counter = SyncCounter()
    for i in range(n):
        x = rows[torch.randperm(len(rows), generator=gen)[:256]]
        if i == n - 1:
            with counter:
                t.train_step(x)
        else:
            t.train_step(x)
    return counter


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_train_step_makes_no_host_sync_on_the_cuda_path(store, tmp_path, as_on_cuda, arch):
    t = _trainer(store, tmp_path, arch=[arch], matryoshka_groups=[0.25, 0.75])
    m = t.members[0]
    m.since_fired[: m.sae.cfg.d_sae // 2] = 10**6  # half the latents dead: AuxK runs
    counter = _steps(t, 3)
    assert counter.calls == []
    assert {"sort", "searchsorted", "topk", "_embedding_bag"} <= counter.seen  # the sparse backward was watched
    assert torch.isfinite(m.last["loss"])


def test_cpu_path_does_sync_so_the_counter_sees_syncs(store, tmp_path):
    t = _trainer(store, tmp_path)
    t.members[0].since_fired[:8] = 10**6
    assert "_local_scalar_dense" in _steps(t, 2).calls  # the CPU AuxK reads the dead count back


@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_sync_free_auxk_equals_the_cpu_path(n_dead, monkeypatch):
    """Same loss and gradients with nothing dead, fewer dead than aux_k (8), and many dead."""
    cfg = ArchConfig(arch="topk", d_in=16, d_sae=64, k=3)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(2))[:n_dead]] = True

    def run():
        sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).train()
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        return out.loss.detach(), out.terms["aux"], [p.grad.clone() for p in sae.parameters()]

    ref = run()
    for mod in (sops, archs):
        monkeypatch.setattr(mod, "sync_free", lambda t: True)
    got = run()
    assert (ref[1] > 0) == (n_dead > 0)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sync_free_batchtopk_equals_the_cpu_path(arch, monkeypatch):
    """The CUDA variant keeps the batch's zero picks as value-0 entries and updates the threshold on
    the device: same loss, gradients and threshold as the CPU path, which drops them, over 3 steps."""
    cfg = ArchConfig(arch=arch, d_in=16, d_sae=64, k=3, group_sizes=[16, 48] if arch == "matryoshka" else None)
    xs = torch.randn(3, 128, 16, generator=torch.Generator().manual_seed(1))

    def run():
        sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).train()
        with torch.no_grad():
            sae.b_enc.fill_(-2.5)  # few positive pre-activations: zeros among the batch's top B·k
        out = []
        for x in xs:
            sae.zero_grad()
            o = sae(x)
            o.loss.backward()
            out.append((o.loss.detach(), o.l0, o.fire_counts, sae._threshold.clone(),
                        [p.grad.clone() for p in sae.parameters()]))
        return out

    ref = run()
    for mod in (sops, archs):
        monkeypatch.setattr(mod, "sync_free", lambda t: True)
    got = run()
    assert float(ref[0][1]) < 3  # some of the top B·k were zeros (dropped on the CPU path)
    for (la, l0a, fa, ta, ga), (lb, l0b, fb, tb, gb) in zip(got, ref):
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
        assert float(l0a) == float(l0b) and torch.equal(fa, fb)
        torch.testing.assert_close(ta, tb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_autocast_trains_with_float32_weights(store, tmp_path):
    kw = dict(store=store.path, arch=["topk"], k=[3], expansion=[4], tokens=256 * 40, batch_size=256,
              scale_sample=2048, eval_rows=512, checkpoint_every=0, eval_every=0, wandb="disabled", quiet=True,
              threads=1)
    ref = train(TrainConfig(out=str(tmp_path / "f32"), **kw))
    got = train(TrainConfig(out=str(tmp_path / "bf16"), dtype="bfloat16", **kw))
    f32 = ref.metrics["topk_k3_x4"]["heldout_fvu"]
    bf16 = got.metrics["topk_k3_x4"]["heldout_fvu"]
    assert bf16 < 0.5 and abs(bf16 - f32) < 0.05, (f32, bf16)  # learned, and close to the float32 run
    sae = load_sae(Path(got.out_dirs[0]))
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_float16_refused_for_archs_with_a_float16_backward(store, tmp_path, capsys):
    assert dispatch(["train", "--store", store.path, "--out", str(tmp_path / "o"), "--arch", "relu",
                     "--dtype", "float16", "--wandb", "disabled"]) == 2
    assert "use --dtype bfloat16" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(store, tmp_path, capsys):
    out = tmp_path / "never"
    assert dispatch(["train", "--store", store.path, "--out", str(out), "--device", "cuda",
                     "--wandb", "disabled", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_collect_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert dispatch(["collect", "--device", "cuda", "--out", str(tmp_path / "s.zarr"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no store, no lock file

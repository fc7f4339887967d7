"""`saeforge train` and `saeforge export` end to end (in-process), errors, and SAELens loading."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

from saeforge.cli import dispatch
from sae.io import load_sae
from sae.synthetic import synthetic_rows, write_synthetic_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("cli") / "s.zarr"), n_tokens=8192, d=16,
                                 n_features=64, active=3, context=64, shard_rows=1024)


def _train(store, out, *extra):
    return dispatch(["train", "--store", store.path, "--out", str(out), "--k", "3", "--expansion", "4",
                     "--tokens", "5120", "--batch-size", "256", "--quiet", "--scale-sample", "2048", *extra])


def test_train_cli_writes_sae_and_wandb_offline_run(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train(store, tmp_path / "o", "--wandb", "offline", "--eval-every", "5") == 0
    assert "held-out FVU" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "o" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["config"]["wandb"] == "offline"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run in ./wandb"


def test_train_cli_toml_and_sweep(store, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[train]\narch = ["topk", "relu"]\nk = [2, 3]\nwandb = "disabled"\n')
    assert dispatch(["train", str(conf), "--store", store.path, "--out", str(tmp_path / "sw"), "--tokens", "2048",
                     "--batch-size", "256", "--quiet", "--scale-sample", "2048"]) == 0
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["relu_x8", "topk_k2_x8", "topk_k3_x8"]


@pytest.mark.parametrize("args,msg", [
    (["--hook", "layers.2.attn_out"], "layers.2.attn_out"),
    (["--wandb", "sometimes"], "--wandb"),
    (["--arch", "gated"], "gated"),
    (["--batch-size", "100000", "--tokens", "100000"], "fewer than one batch"),
])
def test_train_cli_user_errors_exit_2(store, tmp_path, capsys, args, msg):
    assert _train(store, tmp_path / "e", "--wandb", "disabled", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("tr")
    for arch in ("topk", "batchtopk", "relu", "jumprelu", "matryoshka"):
        assert _train(store, root / arch, "--arch", arch, "--wandb", "disabled") == 0
        out[arch] = root / arch
    return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_export_saelens_format(trained, tmp_path, arch):
    assert dispatch(["export", str(trained[arch]), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "architecture", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "metadata"):
        assert key in cfg, key
    assert cfg["normalize_activations"] == "none"
    # what the store recorded, not constants (issue 12 bug 7): the synthetic store has no BOS
    assert cfg["metadata"]["prepend_bos"] is False and cfg["prepend_bos"] is False
    assert cfg["metadata"]["model_class_name"] == "AutoModelForCausalLM"
    assert cfg["metadata"]["hook_name"] == "model.layers.0" and cfg["metadata"]["saeforge_hook_point"] == "layers.0.resid_post"
    w = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert w["W_enc"].shape == (16, 64) and w["W_dec"].shape == (64, 16)
    if cfg["architecture"] == "topk":
        assert cfg["k"] == 3
    if cfg["architecture"] == "jumprelu":
        assert w["threshold"].shape == (64,)


def _saelens_python() -> str:
    """The side virtualenv with sae-lens (.ci/run makes it; SAELENS_PYTHON points at its python).

    sae-lens pulls transformer-lens and pins of its own, so it lives apart from the project's venv."""
    py = os.environ.get("SAELENS_PYTHON", "")
    if not py or not os.access(py, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("CI must run the SAELens parity check: .ci/run sets SAELENS_PYTHON to a venv with sae-lens")
        pytest.skip("SAELENS_PYTHON is not set to a python with sae-lens (see .ci/run for the side venv)")
    return py


def _run_in_saelens(folder: Path, x: torch.Tensor, work: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Load `folder` with sae-lens in the side venv and run it on x: (its class name, {"f": latents,
    "xhat": decode(f), "out": forward(x)})."""
    py = _saelens_python()
    np.save(work / "x.npy", x.numpy())
    p = subprocess.run([py, str(Path(__file__).with_name("saelens_side.py")), str(folder), str(work)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1], {k: torch.from_numpy(np.load(work / f"{k}.npy"))
                                               for k in ("f", "xhat", "out")}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_saelens_loads_export_with_same_encode_decode(trained, tmp_path, arch):
    _saelens_python()  # skipped (or failed under CI) before any work without the side venv
    assert dispatch(["export", str(trained[arch]), "--out", str(tmp_path / "sl")]) == 0
    ours = load_sae(trained[arch])
    x = torch.from_numpy(synthetic_rows(256, 16, 64, 3, seed=5)) * 3
    _, theirs = _run_in_saelens(tmp_path / "sl", x, tmp_path)
    f_theirs, x_theirs = theirs["f"], theirs["xhat"]
    with torch.no_grad():
        f_ours = ours.encode(x)
        assert (f_ours > 0).float().mean() > 0  # a real code, not all zeros
        assert torch.allclose(f_ours, f_theirs, atol=1e-5)
        assert torch.allclose(ours.decode(f_ours), x_theirs, atol=1e-5)


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory):
    """BatchTopK transcoder and skip-transcoder (and a TopK one) on a planted map mlp_in → mlp_out."""
    from sae.synthetic import planted_dictionary, planted_rows
    root = tmp_path_factory.mktemp("tc")
    dx, ox = planted_dictionary(16, 32, seed=1)
    dy, oy = planted_dictionary(16, 32, seed=2)
    x, y = planted_rows(8192, [dx, dy], [ox, oy], active=3)
    st = write_synthetic_store(str(root / "t.zarr"), n_tokens=8192, d=16, context=64, shard_rows=1024,
                               rows={"layers.0.mlp_in": x, "layers.0.mlp_out": y})
    out = {}
    for name, extra in (("batchtopk", []), ("batchtopk_skip", ["--skip"]), ("topk", [])):
        arch = name.split("_")[0]
        assert _train(st, root / name, "--hook", "layers.0.mlp_in", "--target", "layers.0.mlp_out", "--arch", arch,
                      "--wandb", "disabled", *extra) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name,cls", [("batchtopk", "JumpReLUTranscoder"), ("batchtopk_skip", "JumpReLUSkipTranscoder")])
def test_saelens_loads_an_exported_transcoder_with_same_outputs(transcoders, tmp_path, name, cls):
    _saelens_python()
    assert dispatch(["export", str(transcoders[name]), "--out", str(tmp_path / "sl")]) == 0
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["d_out"] == 16 and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["saeforge_target_hook_point"] == "layers.0.mlp_out" and cfg["metadata"]["hook_name_out"]
    ours = load_sae(transcoders[name])
    x = torch.from_numpy(synthetic_rows(256, 16, 32, 3, seed=5)) * 3
    name_theirs, theirs = _run_in_saelens(tmp_path / "sl", x, tmp_path)
    assert name_theirs == cls
    with torch.no_grad():
        f, y = ours.encode_decode(x)  # the output includes the skip term
        assert (f > 0).float().mean() > 0
        assert torch.allclose(f, theirs["f"], atol=1e-5)
        assert torch.allclose(y, theirs["out"], atol=1e-5)
        if name.endswith("skip"):  # the skip term is real: without it SAELens's decode alone differs
            assert not torch.allclose(y, theirs["xhat"], atol=1e-3)


def test_export_of_a_topk_transcoder_or_a_crosscoder_is_refused_in_one_line(transcoders, store, tmp_path, capsys):
    assert dispatch(["export", str(transcoders["topk"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a topk transcoder; SAELens's transcoders are ReLU or JumpReLU" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    d = tmp_path / "cc"  # a cfg.json of kind crosscoder (saved by saeforge) is refused before its weights are read
    assert _train(store, d, "--wandb", "disabled") == 0
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "kind": "crosscoder"}))
    assert dispatch(["export", str(d), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a crosscoder; SAELens has no crosscoder class" in err and len(err.splitlines()) == 1


def test_export_errors(tmp_path, capsys):
    assert dispatch(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not an SAE directory" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert dispatch(["export", str(tmp_path / "d"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("cmd", ["train", "export"])
def test_help_works(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        dispatch([cmd, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_export_to_and_from_urls(trained):
    """export reads an SAE from an fsspec URL and writes the SAELens folder to one (issue 12 bug 3)."""
    import fsspec
    fs = fsspec.filesystem("memory")
    for name in ("sae.safetensors", "cfg.json"):
        fs.pipe_file(f"/exp-src/{name}", (trained["topk"] / name).read_bytes())
    assert dispatch(["export", "memory://exp-src", "--out", "memory://exp-dst"]) == 0
    cfg = json.loads(fs.cat_file("/exp-dst/cfg.json"))
    assert cfg["k"] == 3 and fs.isfile("/exp-dst/sae_weights.safetensors")
    fs.rm("/exp-src", recursive=True)
    fs.rm("/exp-dst", recursive=True)

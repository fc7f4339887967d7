"""The collector on the packaged SmolLM2 and real wikitext: stored rows equal the model's hidden
states, a killed run resumes with every row present once, and bad input gets one clear line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saeforge.cli import dispatch
from collect.collector import CollectConfig, collect_activations
from saeforge.errors import UserError
from collect.store import Store

pytestmark = pytest.mark.smollm
ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, wikitext_dir: Path, **kw) -> CollectConfig:
    base = dict(corpus=str(wikitext_dir / "valid.txt"), hooks=["layers.3.resid_post", "layers.5.resid_pre"],
                context=64, max_tokens=1024, batch_size=4, out=str(tmp_path / "s.zarr"), shard_rows=256, quiet=True)
    base.update(kw)
    cfg = CollectConfig(**base)
    cfg.validate()
    return cfg


def _hidden_states(smollm2, tokens: np.ndarray, context: int) -> tuple:
    ids = torch.from_numpy(tokens.reshape(-1, context).astype(np.int64))
    with torch.no_grad():
        return smollm2.model(input_ids=ids, output_hidden_states=True).hidden_states


def test_stored_activations_equal_hidden_states(smollm2, wikitext_dir, tmp_path):
    store = collect_activations(_cfg(tmp_path, wikitext_dir), loaded=smollm2)
    assert store.complete and store.n_tokens == 1024
    assert store.hooks == ["layers.3.resid_post", "layers.5.resid_pre"]
    assert store.attrs["model_hash"] == smollm2.weights_hash and store.d_model == 576
    tokens, seq, pos = store.tokens(), store.seq(), store.pos()
    assert (pos == np.tile(np.arange(64), 16)).all()
    assert (seq.reshape(16, 64) == seq.reshape(16, 64)[:, :1]).all()
    assert len(np.unique(seq)) == 16
    assert (tokens.reshape(16, 64)[:, 0] == smollm2.tokenizer.bos_token_id).all()
    keep = store.keep()
    assert not keep[pos == 0].any() and keep.mean() > 0.9
    hs = _hidden_states(smollm2, tokens, 64)
    for hook, i in (("layers.3.resid_post", 4), ("layers.5.resid_pre", 5)):
        want = hs[i].reshape(-1, 576).numpy()
        got = store.activations(hook)
        assert got.dtype == np.float32
        # float16 rounding: relative error 2^-11 of each value
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(axis=1, keepdims=True).mean())
    # every chunk range is aligned and covers the store once
    ranges = store.chunk_ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == 1024
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


def test_bfloat16_storage_round_trips(smollm2, wikitext_dir, tmp_path):
    f32 = collect_activations(_cfg(tmp_path, wikitext_dir, dtype="float32", max_tokens=256,
                                   hooks=["layers.2.resid_post"], out=str(tmp_path / "f.zarr")), loaded=smollm2)
    bf = collect_activations(_cfg(tmp_path, wikitext_dir, dtype="bfloat16", max_tokens=256,
                                  hooks=["layers.2.resid_post"], out=str(tmp_path / "b.zarr")), loaded=smollm2)
    assert bf.group["activations/layers.2.resid_post"].dtype == np.uint16
    a, b = f32.activations("layers.2.resid_post"), bf.activations("layers.2.resid_post")
    want = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(b, want)


def _attrs(path: Path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_kill_9_then_resume_loses_nothing_and_repeats_nothing(smollm2, wikitext_dir, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "collect", "collect", "--corpus", str(wikitext_dir / "valid.txt"),
           "--hooks", "layers.12.resid_post", "--context", "64", "--max-tokens", "8192", "--batch-size", "4",
           "--shard-rows", "512", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _attrs(out).get("n_tokens", 0) < 1024:
        time.sleep(0.02)
    assert proc.poll() is None, f"collector ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _attrs(out)["n_tokens"]
    assert 0 < killed_at < 8192 and not _attrs(out)["complete"]
    rc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    store = Store.open(out)
    assert store.complete and store.n_tokens == 8192
    seq = store.seq()
    assert (np.unique(seq) == np.arange(128)).all() and (np.bincount(seq) == 64).all()
    ref = collect_activations(CollectConfig(corpus=str(wikitext_dir / "valid.txt"), hooks=["layers.12.resid_post"],
                                            context=64, max_tokens=8192, batch_size=4, shard_rows=512,
                                            out=str(tmp_path / "ref.zarr"), quiet=True), loaded=smollm2)
    np.testing.assert_array_equal(store.tokens(), ref.tokens())
    np.testing.assert_array_equal(store.keep(), ref.keep())
    np.testing.assert_array_equal(store.heldout(), ref.heldout())
    np.testing.assert_allclose(store.activations("layers.12.resid_post"), ref.activations("layers.12.resid_post"),
                               rtol=2e-3, atol=2e-2)


def test_resume_with_other_hook_is_refused(smollm2, wikitext_dir, tmp_path):
    collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=256), loaded=smollm2)
    with pytest.raises(UserError, match="hook_points"):
        collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=256, hooks=["layers.4.resid_post"]), loaded=smollm2)
    with pytest.raises(UserError, match="context"):
        collect_activations(_cfg(tmp_path, wikitext_dir, max_tokens=256, context=32, shard_rows=256), loaded=smollm2)


@pytest.mark.parametrize("hooks,match", [(["layers.30.resid_post"], "out of range"),
                                         (["layers.2.resid_middle"], "unknown hook point"),
                                         (["blocks.2"], "unknown hook point")])
def test_bad_hooks(smollm2, wikitext_dir, tmp_path, hooks, match):
    with pytest.raises(UserError, match=match):
        collect_activations(_cfg(tmp_path, wikitext_dir, hooks=hooks), loaded=smollm2)


def test_empty_and_missing_corpus(smollm2, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(UserError, match="no non-empty documents"):
        collect_activations(CollectConfig(corpus=str(empty), out=str(tmp_path / "e.zarr"), quiet=True), loaded=smollm2)
    with pytest.raises(UserError, match="does not exist"):
        collect_activations(CollectConfig(corpus=str(tmp_path / "nope.txt"), out=str(tmp_path / "e.zarr"), quiet=True),
                            loaded=smollm2)


def test_cli_errors_are_one_line_exit_2(capsys, tmp_path):
    rc = dispatch(["collect", "--model", "no-such-model", "--out", str(tmp_path / "x.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "no-such-model" in err and "smollm2-135m" in err
    rc = dispatch(["collect", "--context", "1"])
    assert rc == 2 and "--context 1" in capsys.readouterr().err
    rc = dispatch(["collect", str(tmp_path / "missing.toml")])
    assert rc == 2 and "not found" in capsys.readouterr().err

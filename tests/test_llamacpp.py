"""llama.cpp as a second backend, tested against the real llama.cpp (the library llama-cpp-python
compiles from its vendored sources) on the packaged SmolLM2-135M Q4_1 GGUF: its graph tensors are
saeforge's hook points, exported control vectors change exactly the layer they name, greedy steered
generations agree with PyTorch's, and a llama.cpp-collected store honours the store contract and trains.

Without the bindings these tests skip with the reason; under CI (CI set) they fail instead, so CI
always runs them. `SAEFORGE_LLAMA_COMPLETION` (or `llama-completion` on PATH) adds the check against
llama.cpp's own command-line tool."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.directions import SteeringVector, actadd
from analysis.steer_apply import added_vectors, steer
from analysis.steer_files import save_gguf
from analysis.steer_sampling import Sampling
from collect.collector import CollectConfig, collect_activations
from collect.store import Store
from saeforge.errors import UserError, run_cli

pytestmark = pytest.mark.smollm
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "I hate you because"


def _need_bindings() -> None:
    from collect.llamacpp import available
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the llama.cpp tests, but: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def gguf() -> str:
    _need_bindings()
    from collect.backends import gguf_path
    try:
        return gguf_path("smollm2-135m")
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lcm(gguf):
    from collect.llamacpp import LlamaCppModel
    m = LlamaCppModel(gguf, n_threads=torch.get_num_threads())
    yield m
    m.close()


@pytest.fixture(scope="module")
def love(smollm2) -> SteeringVector:
    return actadd(smollm2.model, smollm2.tokenizer, ["Love"], ["Hate"], "layers.4.resid_post", ["layers.6.resid_post"])


def _ids(smollm2, text: str) -> list[int]:
    return list(smollm2.tokenizer(text, add_special_tokens=False).input_ids)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_graph_tensors_are_the_pytorch_hook_points(smollm2, lcm):
    from analysis.compare_backends import torch_side
    from collect.llamacpp import graph_point
    ids = _ids(smollm2, "The capital of France is")
    names = ["layers.0.resid_post", "layers.6.resid_post", "layers.7.resid_pre", "layers.6.attn_out",
             "layers.6.mlp_out", "layers.29.resid_post", "final_norm"]
    gps = [graph_point(n, lcm.n_layer, lcm.arch) for n in names]
    assert [g.tensor for g in gps] == ["l_out-0", "l_out-6", "l_out-6", "attn_out-6", "ffn_out-6", "l_out-29",
                                       "result_norm"]
    ours, logits = lcm.hidden_and_logits(np.asarray([ids], np.int32), gps)
    ref, ref_logits = torch_side(smollm2.model, ids, names)
    for n in names:   # Q4_1 weights and Q8 activations vs the de-quantised float32 model
        assert _cos(ours[n][0], ref[n]).min() > (0.995 if n.endswith("attn_out") else 0.998), n
    # a wrong mapping (another layer, or the residual sum instead of the FFN output) is far off
    assert _cos(ours["layers.6.mlp_out"][0], ref["layers.6.resid_post"]).max() < 0.9
    assert _cos(ours["layers.6.resid_post"][0], ref["layers.0.resid_post"]).max() < 0.9
    assert (logits[0].argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.8
    # the forward that stops after layer 6 reads the same values as the whole forward
    early = lcm.hidden(np.asarray([ids], np.int32), gps[1:2])
    np.testing.assert_array_equal(early["layers.6.resid_post"], ours["layers.6.resid_post"])


def test_compare_backends_reports_every_layer(smollm2, monkeypatch, tmp_path, capsys):
    """Issue 17 (c): cosine > 0.999 on SmolLM2 Q4_1 for every layer (mean over positions; the minimum is
    above 0.999 for layers 0-28 and above 0.998 at layer 29, whose outputs are the largest)."""
    _need_bindings()
    import collect.model
    from analysis.compare_backends_cli import main
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    out = tmp_path / "cmp"
    (tmp_path / "prompts.txt").write_text("Water boils at one hundred degrees Celsius at sea level.\n")
    rc = run_cli(main, ["--prompt", "The capital of France is", "--prompts-file", str(tmp_path / "prompts.txt"),
                        "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    summary = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    points = summary["points"]
    assert list(points) == [f"layers.{i}.resid_post" for i in range(30)]
    for p, s in points.items():
        assert s["cosine_mean"] > 0.999 and s["cosine_min"] > (0.998 if p == "layers.29.resid_post" else 0.999), p
        assert s["rel_error_max"] < 0.06, p
    assert summary["same_tokenization"] and summary["quantization"] == "Q4_1"
    n_tok = sum(len(p["tokens"]) for p in summary["prompts"])
    assert summary["top1_agree"] >= 0.8 * n_tok
    assert len((out / "compare.csv").read_text().splitlines()) == 1 + 30 * n_tok
    assert (out / "cosine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layers.29.resid_post" in text and "next-token top-1 agrees" in text


def test_exported_control_vector_moves_exactly_its_layer(lcm, smollm2, love, tmp_path):
    """Issue 17 (a): the GGUF saeforge writes, loaded as llama.cpp loads it, changes l_out-6 by exactly
    the vector and leaves l_out-5 unchanged."""
    from collect.llamacpp import graph_point, load_control_vector
    added = SteeringVector(added_vectors(love, 0.5), love.meta)
    path = save_gguf(added, tmp_path / "love.gguf", lcm.n_layer, n_embd=lcm.n_embd)
    data = load_control_vector([(path, 1.0)], lcm.n_embd, lcm.n_layer)
    ids = np.asarray([_ids(smollm2, PROMPT)], np.int32)
    gps = [graph_point(p, lcm.n_layer, lcm.arch) for p in ("layers.5.resid_post", "layers.6.resid_post")]
    plain = lcm.hidden(ids, gps)
    lcm.set_control_vector(data)
    try:
        steered = lcm.hidden(ids, gps)
    finally:
        lcm.set_control_vector(None)
    np.testing.assert_array_equal(steered["layers.5.resid_post"], plain["layers.5.resid_post"])
    vec = added.directions["layers.6.resid_post"].numpy()
    diff = steered["layers.6.resid_post"][0] - plain["layers.6.resid_post"][0]
    np.testing.assert_allclose(diff, np.broadcast_to(vec, diff.shape), atol=1e-4, rtol=0)
    assert np.linalg.norm(vec) > 10


def test_control_vector_files_llama_cpp_would_ignore_are_refused(lcm, tmp_path):
    import gguf

    from collect.llamacpp import load_control_vector

    def write(name: str, tensors: dict) -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), arch="controlvector")
        for k, v in tensors.items():
            w.add_tensor(k, v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    v = np.ones(lcm.n_embd, np.float32)
    for name, tensors, match in (("wide.gguf", {"direction.6": np.ones(100, np.float32)}, "n_embd is 576"),
                                 ("late.gguf", {"direction.30": v}, "last steerable block"),
                                 ("zero.gguf", {"direction.0": v}, "K ≥ 1")):
        with pytest.raises(UserError, match=match):
            load_control_vector([(write(name, tensors), 1.0)], lcm.n_embd, lcm.n_layer)
    # saeforge refuses to write them in the first place
    with pytest.raises(UserError, match="n_embd is 576"):
        save_gguf(SteeringVector({"layers.6.resid_post": torch.ones(100)}), tmp_path / "w.gguf", 30, n_embd=576)
    with pytest.raises(UserError, match="blocks 1..29"):
        save_gguf(SteeringVector({"layers.0.resid_post": torch.ones(576)}), tmp_path / "w.gguf", 30, n_embd=576)


def test_greedy_steered_generation_agrees_with_pytorch(smollm2, lcm, love, tmp_path):
    """Issue 17 (b): greedy steered generation in llama.cpp (control vector, its sampler chain) and in
    PyTorch agree on the first tokens, and at each of them llama.cpp's choice is clear (top-2 gap)."""
    from analysis import steer_llamacpp as LC
    from analysis.steer_eval import encode, generate
    added = SteeringVector(added_vectors(love, 2.0), love.meta)
    path = save_gguf(added, tmp_path / "love.gguf", lcm.n_layer, n_embd=lcm.n_embd)
    s = Sampling(temperature=0, repeat_penalty=1.0)
    ids = encode(smollm2.tokenizer, PROMPT)
    ours = generate(smollm2.model, smollm2.tokenizer, ids, 12, s, ctx=steer(smollm2.model, love, coeff=2.0)).tolist()
    prompt = LC.prompt_tokens(lcm, PROMPT, chat=False)
    assert prompt == ids[0].tolist()
    theirs = LC.generate(lcm, prompt, 12, s, control_vector=path)
    base = LC.generate(lcm, prompt, 12, s)
    clear = next((i for i, m in enumerate(theirs.margins) if m < 0.05), len(theirs.margins))
    assert clear >= 6, theirs.margins
    assert ours[:clear] == theirs.tokens[:clear], (smollm2.tokenizer.decode(ours), theirs.text)
    assert theirs.tokens != base.tokens and " love" in theirs.text


def test_steer_cli_generates_in_llama_cpp_side_by_side(smollm2, monkeypatch, tmp_path, capsys):
    _need_bindings()
    import collect.model
    from analysis.steer_cli import main
    monkeypatch.setattr(collect.model, "load_model", lambda *a, **k: smollm2)
    rc = run_cli(main, ["--add", "Love", "--sub", "Hate", "--source-layer", "4", "--layer", "6", "--coeff", "0.5",
                        "--prompt", PROMPT, "--max-new-tokens", "40", "--temperature", "0", "--repeat-penalty", "1.1",
                        "--gguf", str(tmp_path / "love.gguf"), "--backend", "llama.cpp", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "STEERED (llama.cpp)" in text and "prompt tokens identical to PyTorch's" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("greedy steered:"))
    assert "(all of them)" in line, text
    assert run_cli(main, ["--add", "Love", "--sub", "Hate", "--op", "ablate", "--backend", "llama.cpp"]) == 2
    assert "cannot express --op ablate" in capsys.readouterr().err


def _llama_completion() -> str | None:
    return os.environ.get("SAEFORGE_LLAMA_COMPLETION") or shutil.which("llama-completion")


def test_llama_completion_cli_generates_what_saeforge_shows(gguf, smollm2, lcm, love, tmp_path):
    """The README command, run with llama.cpp's own tool and loader: the same continuation as saeforge's
    llama.cpp side (and so as PyTorch's, see the test above)."""
    from analysis import steer_llamacpp as LC
    exe = _llama_completion()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI builds llama-completion (.ci/run) and sets SAEFORGE_LLAMA_COMPLETION")
        pytest.skip("llama-completion not found; set SAEFORGE_LLAMA_COMPLETION to llama.cpp's llama-completion")
    added = SteeringVector(added_vectors(love, 0.5), love.meta)
    path = save_gguf(added, tmp_path / "love.gguf", lcm.n_layer, n_embd=lcm.n_embd)
    cmd = [exe, "-m", gguf, "-no-cnv", "--no-display-prompt", "-p", PROMPT, "-n", "24", "--temp", "0",
           "--repeat-penalty", "1.1", "-t", str(torch.get_num_threads()), "--control-vector-scaled", f"{path}:1.0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = LC.generate(lcm, LC.prompt_tokens(lcm, PROMPT, False), 24, Sampling(temperature=0, repeat_penalty=1.1),
                       control_vector=path)
    assert run.stdout.replace("[end of text]", "").strip() == ours.text.strip()
    assert " love" in ours.text


@pytest.fixture(scope="module")
def stores(tmp_path_factory, wikitext_dir, smollm2, gguf):
    """The same collection run through both backends (layers 6 resid_post and 3 attn_out)."""
    tmp = tmp_path_factory.mktemp("lc")
    # one wikitext paragraph per document (articles are thousands of tokens: too few to split by)
    lines = (wikitext_dir / "valid.txt").read_text(encoding="utf-8").splitlines()
    paras = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("=")]
    (tmp / "paras.txt").write_text("\n\n".join(paras[:300]), encoding="utf-8")
    kw = dict(corpus=str(tmp / "paras.txt"), hooks=["layers.6.resid_post", "layers.3.attn_out"], context=64,
              max_tokens=2048, batch_size=8, shard_rows=512, heldout_fraction=0.2, quiet=True)
    lc = collect_activations(CollectConfig(out=str(tmp / "lc.zarr"), backend="llama.cpp", **kw))
    pt = collect_activations(CollectConfig(out=str(tmp / "pt.zarr"), **kw), loaded=smollm2)
    return lc, pt, kw


def test_llama_cpp_store_follows_the_store_contract(stores):
    lc, pt, _ = stores
    assert lc.complete and lc.n_tokens == pt.n_tokens == 2048
    assert lc.attrs["backend"] == "llama.cpp" and lc.attrs["quantization"] == "Q4_1"
    assert pt.attrs["backend"] == "torch"
    assert lc.attrs["hook_modules"] == {"layers.6.resid_post": "l_out-6", "layers.3.attn_out": "attn_out-3"}
    for name in ("tokens", "seq", "pos", "keep", "heldout"):   # the same batches: one packer, same tokenizer ids
        np.testing.assert_array_equal(getattr(lc, name)(), getattr(pt, name)(), err_msg=name)
    keep = lc.keep()
    assert 0.9 < keep.mean() < 1 and lc.heldout().any()
    for h, floor in (("layers.6.resid_post", 0.999), ("layers.3.attn_out", 0.995)):
        cos = _cos(lc.activations(h)[keep], pt.activations(h)[keep])
        assert np.median(cos) > floor and cos.mean() > floor - 0.002, h


def test_llama_cpp_store_trains_an_sae_that_beats_the_mean(stores, tmp_path):
    """Issue 17 (d): the trainer takes the llama.cpp store like any store."""
    from sae.config import TrainConfig
    from sae.trainer import train
    lc, _, _ = stores
    res = train(TrainConfig(store=lc.path, hook="layers.6.resid_post", out=str(tmp_path / "sae"), arch=["topk"],
                            k=[16], expansion=[2], tokens=256 * 60, batch_size=256, wandb="disabled", quiet=True,
                            eval_every=0, checkpoint_every=0, scale_sample=2048, eval_rows=256))
    m = next(iter(res.metrics.values()))
    assert m["heldout_fvu"] < 0.6, m   # the mean predictor scores 1.0


def test_kill_9_then_resume_gives_the_uninterrupted_store(stores, tmp_path):
    lc, _, kw = stores
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "collect", "collect", "--backend", "llama.cpp", "--corpus", kw["corpus"],
           "--hooks", "layers.6.resid_post,layers.3.attn_out", "--context", "64", "--max-tokens", "2048",
           "--batch-size", "8", "--shard-rows", "512", "--heldout-fraction", "0.2", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def committed() -> int:
        try:
            return int(json.loads((out / "zarr.json").read_text())["attributes"].get("n_tokens", 0))
        except (OSError, ValueError, KeyError):
            return 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and committed() < 512:
        time.sleep(0.02)
    assert proc.poll() is None, f"collector ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed() < 2048
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    st = Store.open(out)
    assert st.complete and st.n_tokens == 2048
    for name in ("tokens", "seq", "keep", "heldout"):
        np.testing.assert_array_equal(getattr(st, name)(), getattr(lc, name)(), err_msg=name)
    for h in lc.hooks:   # llama.cpp on the same sequences with the same threads: the same bits
        np.testing.assert_array_equal(st.raw_activations(h), lc.raw_activations(h), err_msg=h)


def test_bad_input_gets_one_line(gguf, tmp_path, capsys):
    from collect.llamacpp import LlamaCppModel, graph_point
    bad = tmp_path / "foo.gguf"
    import gguf as gg
    w = gg.GGUFWriter(str(bad), arch="no-such-arch")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="llama.cpp cannot load .*no-such-arch"):
        LlamaCppModel(bad)
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(UserError, match="not a GGUF file"):
        LlamaCppModel(tmp_path / "text.gguf")
    with pytest.raises(UserError, match="out of range"):
        graph_point("layers.30.resid_post", 30, "llama")
    with pytest.raises(UserError, match="token embedding"):
        graph_point("embed", 30, "llama")
    with pytest.raises(UserError, match="not verified"):
        graph_point("layers.3.attn_out", 30, "gemma2")
    assert graph_point("layers.-1.resid_post", 30, "gemma2").tensor == "l_out-29"
    from saeforge.cli import dispatch
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for args, match in ((["--hooks", "layers.31.resid_post"], "out of range"),
                        (["--hooks", "embed"], "token embedding"),
                        (["--model-dtype", "bfloat16"], "does not apply"),
                        (["--model", str(hf)], "not one")):
        rc = dispatch(["collect", "--backend", "llama.cpp", "--out", str(tmp_path / "x.zarr"), "--quiet", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and match in err, err


def test_missing_bindings_are_one_clear_line(monkeypatch):
    import collect.llamacpp as LCP
    monkeypatch.setattr(LCP, "_STATE", {})
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"llama-cpp-python bindings, which are not installed; pip install"):
        LCP.bindings()
    assert "not installed" in (LCP.available() or "")

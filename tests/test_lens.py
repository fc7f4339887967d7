"""Logit lens on the packaged SmolLM2: exactness against the model's own output, the CLI's files, errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from analysis import lens_cli
from analysis.lens import logit_lens, single_token_id, unembedder
from saeforge.errors import UserError

pytestmark = pytest.mark.smollm

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def lens(smollm2):
    return logit_lens(smollm2.model, smollm2.tokenizer, PROMPT, target=" Paris", top=5)


def test_last_layer_equals_model_output(smollm2, lens):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(smollm2.model(input_ids=ids).logits[0].float(), dim=-1)
    target = smollm2.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert lens.target_id == target
    assert lens.target_probs.shape == lens.target_ranks.shape == (30, ids.shape[1])
    torch.testing.assert_close(lens.target_probs[-1], probs[:, target], rtol=1e-5, atol=1e-7)
    top_p, top_i = probs.topk(5, dim=-1)
    assert torch.equal(lens.top_ids[-1], top_i)
    torch.testing.assert_close(lens.top_probs[-1], top_p, rtol=1e-5, atol=1e-7)
    # the model itself answers " Paris" here, so the last layer ranks it first at the last position
    assert int(lens.target_ranks[-1, -1]) == 1 and lens.top_tokens[-1][-1][0] == " Paris"


def test_middle_layer_matches_hidden_states(smollm2, lens):
    """Row i decodes hidden_states[i+1] through the final norm and unembedding."""
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = smollm2.model(input_ids=ids, output_hidden_states=True).hidden_states
        probs = torch.softmax(unembedder(smollm2.model)(hs[11][0]), dim=-1)
    torch.testing.assert_close(lens.target_probs[10], probs[:, lens.target_id], rtol=1e-5, atol=1e-9)
    ranks = (probs > probs[:, lens.target_id : lens.target_id + 1]).sum(-1) + 1
    assert torch.equal(lens.target_ranks[10], ranks)
    # the answer forms late: it is far from the top in the first half of the network
    assert int(lens.target_ranks[:15, -1].min()) > 100


def test_without_target(smollm2):
    res = logit_lens(smollm2.model, smollm2.tokenizer, "Hello world", top=2)
    assert res.target_probs is None and res.target_ranks is None
    assert res.top_ids.shape == (30, len(res.tokens), 2)
    assert "target_prob" not in res.rows()[0]


def test_multi_token_target_is_a_user_error(smollm2):
    with pytest.raises(UserError, match=r"is \d+ tokens \[") as e:
        logit_lens(smollm2.model, smollm2.tokenizer, PROMPT, target=" Parisian Eiffelness")
    assert "single token" in str(e.value)
    with pytest.raises(UserError, match="empty"):
        single_token_id(smollm2.tokenizer, "", "--target")
    with pytest.raises(UserError, match="--prompt"):
        logit_lens(smollm2.model, smollm2.tokenizer, "   ", target=" Paris")


def test_cli_writes_table_csv_json_png(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lens_cli, "load_model", lambda *a, **k: smollm2)
    out = tmp_path / "lens"
    rc = lens_cli.main(["--prompt", PROMPT, "--target", " Paris", "--out", str(out), "--top", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "' Paris'" in printed and "top-1 token per layer" in printed
    with open(out / "lens.csv") as f:
        rows = list(csv.DictReader(f))
    n_pos = len(smollm2.tokenizer(PROMPT).input_ids)
    assert len(rows) == 30 * n_pos
    last = [r for r in rows if r["layer"] == "29" and int(r["position"]) == n_pos - 1][0]
    assert last["top1_token"] == " Paris" and last["target_rank"] == "1"
    assert 0.5 < float(last["target_prob"]) <= 1.0
    data = json.loads((out / "lens.json").read_text())
    assert len(data["target_probs"]) == 30 and data["target"] == " Paris"
    assert (out / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["top"] == 3


def test_cli_errors(smollm2, monkeypatch):
    monkeypatch.setattr(lens_cli, "load_model", lambda *a, **k: smollm2)
    with pytest.raises(UserError, match="--prompt is required"):
        lens_cli.main(["--target", " Paris"])
    with pytest.raises(UserError, match="--position 50"):
        lens_cli.main(["--prompt", "Hi there", "--position", "50", "--out", "/nonexistent/never"])


def test_cli_refuses_a_file_as_out_before_loading_the_model(tmp_path, monkeypatch):
    f = tmp_path / "taken"
    f.write_text("x")

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(lens_cli, "load_model", never)
    with pytest.raises(UserError, match="is an existing file, not a directory"):
        lens_cli.main(["--prompt", "Hi there", "--out", str(f)])

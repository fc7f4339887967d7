"""Activation patching on the packaged SmolLM2: full recovery, zero baseline, batched = unbatched,
the CLI's files, and errors for mismatched lengths and multi-token answers."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from analysis import patch_cli
from analysis.patching import activation_patching, patched_metric
from saeforge.errors import UserError
from collect.hooks import capture

pytestmark = pytest.mark.smollm

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
ANSWER, WRONG = " Paris", " Rome"
LAYERS = [0, 1, 3, 9, 20, 23, 25, 29]   # a subset keeps the sweep cheap on 2 loaded cores


@pytest.fixture(scope="module")
def result(smollm2):
    return activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, ANSWER, WRONG, site="resid_post",
                               layers=LAYERS)


def _row(result, layer):
    return result.layers.index(layer)


def _ids(tok, text):
    return tok(text, return_tensors="pt").input_ids


def _clean_act(model, ids, point):
    with capture(model, [point]) as acts, torch.no_grad():
        model(input_ids=ids)
    return acts[point]


def test_example_prompts_disagree(result):
    """The README example: the clean prompt prefers ' Paris', the corrupted one ' Rome', clearly."""
    assert result.clean_metric > 1.0 and result.corrupt_metric < -1.0
    assert result.scores.shape == (len(LAYERS), len(result.clean_tokens)) == result.raw.shape
    assert result.layers == LAYERS


def test_last_layer_row(result):
    """After the last block only the last position reaches the logits: it recovers 1, the rest 0."""
    torch.testing.assert_close(result.scores[-1, -1], torch.tensor(1.0), atol=1e-4, rtol=0)
    assert result.scores[-1, :-1].abs().max() < 1e-4
    # position 0 ('The') is the same token in both prompts: patching it changes nothing at any layer
    assert result.scores[:, 0].abs().max() < 1e-4
    # the subject tokens carry the answer in the early layers
    early = [_row(result, i) for i in LAYERS if i < 10]
    assert result.scores[early, 1:4].max(dim=1).values.min() > 0.5
    # ... and by layer 23 it has moved to the last position
    assert result.scores[_row(result, 23), -1] > 0.5 and result.scores[_row(result, 23), 1:4].max() < 0.1


@pytest.mark.parametrize("point", ["layers.0.resid_pre", "layers.29.resid_post", "layers.12.resid_post"])
def test_patch_all_positions_recovers_one_and_nothing_gives_zero(smollm2, result, point):
    tok, model = smollm2.tokenizer, smollm2.model
    clean_ids, corrupt_ids = _ids(tok, CLEAN), _ids(tok, CORRUPT)
    T = clean_ids.shape[1]
    act = _clean_act(model, clean_ids, point)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0] = True                                   # row 0: every position patched; row 1: none
    raw = patched_metric(model, corrupt_ids, point, act, mask, result.answer_id, result.wrong_id)
    scores = (raw - result.corrupt_metric) / (result.clean_metric - result.corrupt_metric)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)


def test_batched_equals_one_position_at_a_time(smollm2, result):
    tok, model = smollm2.tokenizer, smollm2.model
    clean_ids, corrupt_ids = _ids(tok, CLEAN), _ids(tok, CORRUPT)
    T = clean_ids.shape[1]
    for layer, pos in [(3, 2), (20, 3), (25, T - 1)]:
        point = f"layers.{layer}.resid_post"
        act = _clean_act(model, clean_ids, point)
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[0, pos] = True
        raw = patched_metric(model, corrupt_ids, point, act, mask, result.answer_id, result.wrong_id)
        torch.testing.assert_close(raw[0], result.raw[_row(result, layer), pos], atol=1e-4, rtol=0)


def test_other_sites_and_chunking(smollm2, result):
    """mlp_out with chunks of 4 positions: well-formed, and patching position 0 does nothing."""
    res = activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, ANSWER, WRONG, site="mlp_out",
                              layers=[0, -1], batch_size=4)
    assert res.layers == [0, 29] and res.scores.shape == (2, len(res.clean_tokens))
    assert abs(res.clean_metric - result.clean_metric) < 1e-4
    assert res.scores[:, 0].abs().max() < 1e-4
    assert res.scores[1, :-1].abs().max() < 1e-4     # the last MLP only moves its own position


def test_mismatched_lengths_is_a_user_error(smollm2):
    with pytest.raises(UserError, match=r"--clean is \d+ tokens .* --corrupt is \d+ tokens") as e:
        activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, "The big old Colosseum is in the city of",
                            ANSWER, WRONG)
    assert "same token length" in str(e.value)


def test_multi_token_answer_is_a_user_error(smollm2):
    with pytest.raises(UserError, match=r"--answer ' Parisianville' is \d+ tokens \["):
        activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, " Parisianville", WRONG)
    with pytest.raises(UserError, match="same token"):
        activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, ANSWER, ANSWER)
    with pytest.raises(UserError, match="--hook 'resid_mid'"):
        activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, ANSWER, WRONG, site="resid_mid")
    with pytest.raises(UserError, match="out of range"):
        activation_patching(smollm2.model, smollm2.tokenizer, CLEAN, CORRUPT, ANSWER, WRONG, layers=[30])


def test_cli_writes_csv_json_png(smollm2, result, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(patch_cli, "load_model", lambda *a, **k: smollm2)
    out = tmp_path / "patch"
    rc = patch_cli.main(["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", ANSWER, "--wrong", WRONG,
                         "--hook", "resid_post", "--layers", "3,-1", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "best cell" in capsys.readouterr().out
    with open(out / "patch.csv") as f:
        rows = list(csv.DictReader(f))
    T = len(result.clean_tokens)
    assert len(rows) == 2 * T and {r["layer"] for r in rows} == {"3", "29"}
    for r in rows:   # the CLI's numbers are the library's
        want = result.scores[_row(result, int(r["layer"])), int(r["position"])]
        assert abs(float(r["score"]) - float(want)) < 1e-4
    data = json.loads((out / "patch.json").read_text())
    assert data["layers"] == [3, 29] and len(data["scores"]) == 2
    assert (out / "patch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_requires_prompts(smollm2, monkeypatch):
    monkeypatch.setattr(patch_cli, "load_model", lambda *a, **k: smollm2)
    with pytest.raises(UserError, match="--corrupt is required"):
        patch_cli.main(["--clean", CLEAN, "--answer", ANSWER, "--wrong", WRONG])
    with pytest.raises(UserError, match="--hook 'resid'"):
        patch_cli.main(["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", ANSWER, "--wrong", WRONG,
                        "--hook", "resid"])

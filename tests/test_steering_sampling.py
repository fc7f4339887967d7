"""Sampling in llama.cpp's order and with its defaults: the windowed repeat penalty, top-p/min-p read
before the temperature, greedy after the penalty, and the flags' bad values."""
from __future__ import annotations

import types

import pytest
import torch

from analysis.steer_eval import generate
from analysis.steer_sampling import Sampling, WindowedRepeatPenalty, logits_processors
from saeforge.errors import UserError
from tests.tiny_models import tiny_model


def test_defaults_are_llama_cpps():
    s = Sampling()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, s.repeat_last_n) == \
        (0.8, 40, 0.95, 0.05, 1.0, 64)


def test_repeat_penalty_covers_only_the_window():
    scores = torch.tensor([[2.0, -2.0, 2.0, 2.0, 1.0]])
    ids = torch.tensor([[0, 1, 1, 2, 3]])               # token 0 falls outside a window of 4
    got = WindowedRepeatPenalty(2.0, 4)(ids, scores.clone())
    torch.testing.assert_close(got, torch.tensor([[2.0, -4.0, 1.0, 1.0, 1.0]]))   # once per distinct token
    torch.testing.assert_close(WindowedRepeatPenalty(2.0, -1)(ids, scores.clone()),
                               torch.tensor([[1.0, -4.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(WindowedRepeatPenalty(2.0, 0)(ids, scores.clone()), scores)


def test_top_p_is_taken_before_the_temperature():
    """llama.cpp filters top-p/min-p on the untempered distribution, then applies the temperature;
    transformers' default order (temperature first) would keep a different set here."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    s = Sampling(temperature=4.0, top_k=0, top_p=0.8, min_p=0.0)
    out = logits_processors(s)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]      # p = .64 .24 → .88 ≥ .8
    torch.testing.assert_close(out[0, :2], logits[0, :2] / 4.0)
    hot = torch.softmax(logits / 4.0, -1)                                    # tempered first: 3 tokens needed
    assert float(hot[0, :2].sum()) < 0.8


def test_greedy_generation_obeys_the_repeat_penalty():
    model = tiny_model("llama")
    tok = types.SimpleNamespace(pad_token_id=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = generate(model, tok, ids, 24, Sampling(temperature=0))
    assert len(set(plain.tolist())) < 24                                    # a random tiny model repeats itself
    strict = generate(model, tok, ids, 24, Sampling(temperature=0, repeat_penalty=1e4, repeat_last_n=-1))
    seen = ids[0].tolist() + strict.tolist()
    assert len(set(seen)) == len(seen) and strict.tolist() != plain.tolist()
    a = generate(model, tok, ids, 8, Sampling(seed=3))
    assert torch.equal(a, generate(model, tok, ids, 8, Sampling(seed=3)))   # seeded


@pytest.mark.parametrize("field,value,match", [("repeat_penalty", 0.0, "--repeat-penalty"),
                                               ("top_p", 1.5, "--top-p"), ("min_p", 1.0, "--min-p"),
                                               ("repeat_last_n", -2, "--repeat-last-n")])
def test_bad_values_are_user_errors(field, value, match):
    with pytest.raises(UserError, match=match):
        Sampling(**{field: value}).validate()

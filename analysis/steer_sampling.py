"""Sampling settings shared by saeforge's PyTorch generation and llama.cpp's, with llama.cpp's defaults
(common/common.h `common_params_sampling`) and its order (common/sampling.cpp): repeat penalty over the
last `repeat_last_n` tokens (prompt included) → top-k → top-p → min-p → temperature → sample.
Temperature ≤ 0 is greedy after the repeat penalty, in both backends.

transformers' own warpers apply temperature first and its repetition penalty has no window, so the
PyTorch side builds the chain from transformers' warper classes in llama.cpp's order instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from saeforge.errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.repeat_penalty <= 0:
            raise UserError(f"--repeat-penalty {self.repeat_penalty} must be > 0 (1.0 = off, llama.cpp's default)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1] (1.0 = off)")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p {self.min_p} must be in [0, 1) (0 = off)")
        if self.repeat_last_n < -1:
            raise UserError(f"--repeat-last-n {self.repeat_last_n}: use -1 (whole context), 0 (off) or a window")

    def llama_cpp_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.temperature <= 0:
            return f"greedy, repeat penalty {self.repeat_penalty:g} over {self.repeat_last_n}"
        return (f"temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}, min-p {self.min_p:g}, "
                f"repeat penalty {self.repeat_penalty:g} over {self.repeat_last_n}, seed {self.seed}")


class WindowedRepeatPenalty:
    """llama.cpp's repeat penalty: each distinct token among the last `last_n` (−1: all) has its
    logit divided by `penalty` when positive and multiplied when not."""

    def __init__(self, penalty: float, last_n: int):
        self.penalty, self.last_n = penalty, last_n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.penalty == 1.0 or self.last_n == 0:
            return scores
        ids = input_ids if self.last_n < 0 else input_ids[:, -self.last_n:]
        got = torch.gather(scores, 1, ids)
        got = torch.where(got <= 0, got * self.penalty, got / self.penalty)
        return scores.scatter(1, ids, got)


def logits_processors(s: Sampling) -> Any:
    """transformers LogitsProcessorList in llama.cpp's order (greedy: the penalty only)."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    chain: list[Any] = [WindowedRepeatPenalty(s.repeat_penalty, s.repeat_last_n)]
    if s.temperature > 0:
        if s.top_k > 0:
            chain.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            chain.append(TopPLogitsWarper(s.top_p))
        if s.min_p > 0:
            chain.append(MinPLogitsWarper(s.min_p))
        chain.append(TemperatureLogitsWarper(s.temperature) if s.temperature != 1 else _identity)
    return LogitsProcessorList(chain)


def _identity(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return scores

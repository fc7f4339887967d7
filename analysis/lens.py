"""Logit lens: read the residual stream after every layer through the model's own final norm and
unembedding, so each layer gets a next-token distribution at every position.

The final norm is applied to `layers.{i}.resid_post` of every layer, the last one included, so the
last layer's lens is the model's own output distribution. No per-model code: the norm comes from
`Layout.final_norm` and the unembedding from `model.get_output_embeddings()`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from saeforge.errors import UserError
from collect.hooks import forward_to
from collect.layers import Layout, discover_layout

log = logging.getLogger(__name__)


def token_strings(tokenizer: Any, ids: list[int] | torch.Tensor) -> list[str]:
    """Each token id decoded on its own (' Paris', not 'ĠParis')."""
    return [tokenizer.decode([int(i)]) for i in ids]


def encode_prompt(tokenizer: Any, prompt: str, what: str = "--prompt") -> torch.Tensor:
    """`[1, T]` input ids, with the special tokens the tokenizer adds by itself (BOS for some models)."""
    if not prompt or not prompt.strip():
        raise UserError(f"{what} is empty; pass the text to analyse, e.g. {what} \"The capital of France is\"")
    return tokenizer(prompt, return_tensors="pt").input_ids


def single_token_id(tokenizer: Any, text: str, what: str = "--target") -> int:
    """The id of `text` as one token, or a UserError naming how it splits."""
    if not text:
        raise UserError(f"{what} is empty; pass one token, e.g. {what} \" Paris\" (note the leading space)")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = token_strings(tokenizer, ids)
        hint = ""
        if not text.startswith(" "):
            alt = tokenizer(" " + text, add_special_tokens=False).input_ids
            if len(alt) == 1:
                hint = f" ({' ' + text!r} with a leading space is one token)"
        raise UserError(f"{what} {text!r} is {len(ids)} tokens {pieces}, it must be a single token: "
                        f"pass one of them, e.g. {what} {pieces[0]!r}{hint}" if ids else
                        f"{what} {text!r} encodes to no tokens; pass one token, e.g. \" Paris\"")
    return int(ids[0])


def unembedder(model: torch.nn.Module, layout: Layout | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`resid [..., d] -> logits [..., vocab]` (float32) through the model's final norm and unembedding,
    with the final logit soft-capping of models that have one (Gemma 2)."""
    lay = layout or discover_layout(model)
    norm = model.get_submodule(lay.final_norm) if lay.final_norm else None
    if norm is None:
        log.warning("no final norm found in %s; the lens reads the raw residual stream", type(model).__name__)
    head = model.get_output_embeddings()  # type: ignore[operator]  # HF PreTrainedModel method
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None); "
                        "the logit lens needs a causal LM with an unembedding")
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    cap = getattr(cfg, "final_logit_softcapping", None)

    def fn(x: torch.Tensor) -> torch.Tensor:
        h = norm(x) if norm is not None else x
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return fn


@dataclass
class LensResult:
    """One prompt through the logit lens: rows are layers (`layers.{i}.resid_post`), columns positions.

    `top_*` are `[n_layers, n_positions, top]`; `target_probs` and `target_ranks` (1 = most likely)
    are `[n_layers, n_positions]` when a target token was given, else None. The distribution at
    position p is the prediction for the token after position p."""
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    layers: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    target: str | None = None
    target_id: int | None = None
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per (layer, position), for CSV."""
        out = []
        for li, layer in enumerate(self.layers):
            for p, tok in enumerate(self.tokens):
                row: dict[str, Any] = {"layer": li, "hook_point": layer, "position": p, "input_token": tok}
                if self.target_probs is not None:
                    row["target_prob"] = float(self.target_probs[li, p])
                    row["target_rank"] = int(self.target_ranks[li, p])  # type: ignore[index]
                for k in range(self.top_ids.shape[-1]):
                    row[f"top{k + 1}_token"] = self.top_tokens[li][p][k]
                    row[f"top{k + 1}_prob"] = float(self.top_probs[li, p, k])
                out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "tokens": self.tokens, "token_ids": self.token_ids, "layers": self.layers,
            "target": self.target, "target_id": self.target_id,
            "target_probs": None if self.target_probs is None else self.target_probs.tolist(),
            "target_ranks": None if self.target_ranks is None else self.target_ranks.tolist(),
            "top_ids": self.top_ids.tolist(), "top_probs": self.top_probs.tolist(), "top_tokens": self.top_tokens,
        }


@torch.no_grad()
def logit_lens(model: torch.nn.Module, tokenizer: Any, prompt: str, target: str | None = None, top: int = 5,
               layout: Layout | None = None) -> LensResult:
    """Run `prompt` once, capturing `resid_post` of every layer, and decode each through the final
    norm and unembedding. `target` (one token, e.g. " Paris") adds its probability and rank."""
    if top < 1:
        raise UserError(f"--top {top} must be at least 1")
    lay = layout or discover_layout(model)
    target_id = single_token_id(tokenizer, target) if target is not None else None
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt).to(device)
    points = [f"layers.{i}.resid_post" for i in range(lay.n_layers)]
    acts = forward_to(model, ids, points, layout=lay)
    decode = unembedder(model, lay)
    top_ids, top_probs, t_probs, t_ranks = [], [], [], []
    for name in points:
        probs = torch.softmax(decode(acts[name][0]), dim=-1)              # [T, V]
        tp, ti = probs.topk(min(top, probs.shape[-1]), dim=-1)
        top_ids.append(ti.cpu())
        top_probs.append(tp.cpu())
        if target_id is not None:
            p_t = probs[:, target_id]
            t_probs.append(p_t.cpu())
            t_ranks.append(((probs > p_t.unsqueeze(-1)).sum(-1) + 1).cpu())
    top_ids_t = torch.stack(top_ids)
    vocab_cache: dict[int, str] = {}

    def tok(i: int) -> str:
        if i not in vocab_cache:
            vocab_cache[i] = tokenizer.decode([i])
        return vocab_cache[i]

    top_tokens = [[[tok(int(i)) for i in pos] for pos in layer] for layer in top_ids_t.tolist()]
    result = LensResult(
        prompt=prompt, token_ids=ids[0].tolist(), tokens=token_strings(tokenizer, ids[0]), layers=points,
        top_ids=top_ids_t, top_probs=torch.stack(top_probs), top_tokens=top_tokens, target=target,
        target_id=target_id, target_probs=torch.stack(t_probs) if t_probs else None,
        target_ranks=torch.stack(t_ranks) if t_ranks else None)
    if result.target_probs is not None:
        log.info("target %r at the last position: p=%.4f (rank %d) after the last layer", target,
                 float(result.target_probs[-1, -1]), int(result.target_ranks[-1, -1]))  # type: ignore[index]
    return result

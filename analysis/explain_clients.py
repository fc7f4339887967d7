"""The language models behind `saeforge explain`: any causal LM saeforge loads (run here, batched,
with its chat template) or any OpenAI-compatible chat endpoint (llama.cpp's server, vLLM, a hosted
API) given by URL, with the key read from an environment variable.

Both answer two questions: `generate` (a reply per conversation) and `yes_prob` (for a Yes/No
question: P(Yes) from the next-token distribution — exact for a local model, from `top_logprobs`
for an endpoint that returns them, else 1.0/0.0 from the reply's first word, None when it says
neither)."""
from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from typing import Any, Protocol

import torch

from saeforge.errors import UserError

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


class ChatModel(Protocol):
    name: str
    continues: bool  # True: a conversation ending in an assistant message is continued, not answered

    def generate(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]: ...

    def yes_prob(self, conversations: list[Conversation]) -> list[float | None]: ...


class LocalChat:
    """A causal LM in this process (collect.model.LoadedModel), `batch_size` conversations per forward."""

    continues = True

    def __init__(self, lm: Any, batch_size: int = 16):
        self.lm, self.batch_size, self.name = lm, batch_size, lm.spec
        tok = lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise UserError(f"model {lm.spec!r} has no chat template; use an instruct/chat model (the default "
                            f"smollm2-135m is one) or an endpoint URL")
        self.yes_ids = sorted({tok(w, add_special_tokens=False).input_ids[0] for w in YES})
        self.no_ids = sorted({tok(w, add_special_tokens=False).input_ids[0] for w in NO})

    def _batch(self, conversations: list[Conversation]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.lm.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=c[-1]["role"] != "assistant",
                                         continue_final_message=c[-1]["role"] == "assistant") for c in conversations]
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        return enc.input_ids.to(self.lm.device), enc.attention_mask.to(self.lm.device)

    @torch.no_grad()
    def generate(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        tok = self.lm.tokenizer
        for a in range(0, len(conversations), self.batch_size):
            ids, mask = self._batch(conversations[a:a + self.batch_size])
            gen = self.lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         repetition_penalty=1.15, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def yes_prob(self, conversations: list[Conversation]) -> list[float | None]:
        out: list[float | None] = []
        for a in range(0, len(conversations), self.batch_size):
            ids, mask = self._batch(conversations[a:a + self.batch_size])
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                   logits_to_keep=1).logits[:, -1].float()
            lp = logits.log_softmax(-1)
            y = lp[:, self.yes_ids].logsumexp(-1)
            n = lp[:, self.no_ids].logsumexp(-1)
            out += torch.sigmoid(y - n).tolist()
        return out


class EndpointChat:
    """An OpenAI-compatible /chat/completions endpoint, one request per conversation."""
    continues = False

    def __init__(self, url: str, model: str, api_key: str | None, timeout: float = 120.0):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"{model}@{url}"
        self.requests = 0

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").strip()
            hint = "; check the key in the environment variable" if e.code in (401, 403) else ""
            raise UserError(f"endpoint {self.url} answered HTTP {e.code}: {detail or e.reason}{hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise UserError(f"cannot reach endpoint {self.url} ({getattr(e, 'reason', e)}); is the server running?") from None
        except json.JSONDecodeError as e:
            raise UserError(f"endpoint {self.url} did not answer JSON ({e}); is it OpenAI-compatible?") from None

    @staticmethod
    def _message(doc: dict[str, Any], url: str) -> dict[str, Any]:
        try:
            return doc["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"endpoint {url} answered without choices[0] ({str(doc)[:120]}); is it "
                            f"OpenAI-compatible?") from None

    def generate(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        out = []
        for c in conversations:
            ch = self._message(self._post({"model": self.model, "messages": c, "max_tokens": max_new_tokens,
                                           "temperature": 0}), self.url)
            out.append(str((ch.get("message") or {}).get("content") or ""))
        return out

    def yes_prob(self, conversations: list[Conversation]) -> list[float | None]:
        out: list[float | None] = []
        for c in conversations:
            ch = self._message(self._post({"model": self.model, "messages": c, "max_tokens": 2, "temperature": 0,
                                           "logprobs": True, "top_logprobs": 10}), self.url)
            out.append(_yes_from_choice(ch))
        return out


def _yes_from_choice(ch: dict[str, Any]) -> float | None:
    """P(Yes) from the first answer token's top_logprobs when given, else from the reply's first word."""
    content = ((ch.get("logprobs") or {}).get("content") or [])
    if content and content[0].get("top_logprobs"):
        py = pn = 0.0
        for t in content[0]["top_logprobs"]:
            w = str(t.get("token", "")).strip().lower()
            p = math.exp(float(t.get("logprob", -math.inf)))
            if w == "yes":
                py += p
            elif w == "no":
                pn += p
        if py + pn > 0:
            return py / (py + pn)
    text = str((ch.get("message") or {}).get("content") or "").strip().lower()
    if text.startswith("yes"):
        return 1.0
    if text.startswith("no"):
        return 0.0
    return None


def make_client(spec: str, device: str, api_model: str, api_key_env: str, batch_size: int,
                loaded: dict[str, Any] | None = None) -> ChatModel:
    """An endpoint for http(s):// specs, else a local model (loaded once per spec via `loaded`)."""
    if spec.startswith(("http://", "https://")):
        key = os.environ.get(api_key_env)
        if key is None and api_key_env != "OPENAI_API_KEY":
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set; export it "
                            f"with the endpoint's key")
        return EndpointChat(spec, api_model, key)
    from collect.model import load_model
    loaded = {} if loaded is None else loaded
    if spec not in loaded:
        loaded[spec] = load_model(spec, device)
    return LocalChat(loaded[spec], batch_size)

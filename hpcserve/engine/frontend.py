"""Tokenizer side of a served model: chat template, tokenization, length checks, token text.

No weights and no torch tensors: the control daemon holds one ``Frontend`` to turn chat
messages and prompts into token ids before it routes them, and each ``LLMEngine`` holds
one for its offline ``LLM`` API. Both must agree, so both use this class.

Interface: ``Frontend.load(model_dir, model_config, max_model_len, model_name)``;
``apply_chat_template(messages) -> ids``, ``tokenize(prompt) -> ids``,
``check_length(num_prompt_tokens, params)`` (raises ``RequestError`` with code
``context_length_exceeded``), ``default_max_tokens(num_prompt_tokens, cap)``,
``decode_token(id) -> str`` (cached, for logprobs), ``eos_token_ids``. ``max_model_len`` may
be lowered after load (the engine caps it to what its KV cache holds; the daemon to what
every replica accepts).
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcserve.engine.request import SamplingParams
from hpcserve.errors import ModelError, RequestError


class Frontend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], max_model_len: int,
                 model_name: str) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.model_name = model_name
        self._token_text: dict[int, str] = {}

    @classmethod
    def load(cls, model_dir: str | Path, model_config, max_model_len: int, model_name: str) -> Frontend:
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:
            raise ModelError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc
        eos = set(model_config.eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        return cls(tok, model_config.vocab_size, tuple(sorted(eos)), max_model_len, model_name)

    # ------------------------------------------------------------- prompts
    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: must be a non-empty list", field="messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError(f"model {self.model_name} has no chat template; use a completion prompt",
                               field="messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:
            raise RequestError(f"messages: cannot apply the chat template ({exc})", field="messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
            raise RequestError("prompt: must be a string or a list of token ids", field="prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                               field="prompt")
        return list(prompt)

    def check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens < 1:
            raise RequestError("prompt: is empty after tokenization", field="prompt")
        if num_prompt_tokens + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt: {num_prompt_tokens} prompt tokens + max_tokens {params.max_tokens} exceed the model's "
                f"context length of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
                field="prompt", code="context_length_exceeded",
            )

    def default_max_tokens(self, num_prompt_tokens: int, cap: int) -> int:
        """max_tokens for a request that gave none: what is left of the context, at most ``cap``
        (at least 1, so an over-long prompt still gets its context_length_exceeded error)."""
        return max(1, min(cap, self.max_model_len - num_prompt_tokens))

    # --------------------------------------------------------------- output
    def decode_token(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            if len(self._token_text) < 65536:
                self._token_text[token_id] = s
        return s

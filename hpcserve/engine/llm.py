"""Offline Python API: ``LLM`` runs prompts or chats to completion in-process.

    from hpcserve import LLM, SamplingParams
    llm = LLM("demo")                                   # or a local HF dir / .gguf
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    outs = llm.chat([[{"role": "user", "content": "What is 2+2?"}]], SamplingParams(temperature=0))
    print(outs[0].text)

Results come back in input order as ``RequestOutput`` objects (``text``,
``token_ids``, ``finish_reason``, ``logprobs``...). Every prompt shares one engine,
so they are batched continuously. Keyword arguments go to ``EngineConfig``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hpcserve.engine.core import EngineConfig, LLMEngine
from hpcserve.engine.outputs import RequestOutput
from hpcserve.engine.request import SamplingParams


class LLM:
    def __init__(self, model: str = "demo", **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.engine.apply_chat_template(list(c)) for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        order: dict[str, int] = {}
        for prompt, p in zip(prompts, params):
            req_id = f"offline-{next(self._ids)}"
            self.engine.add_request(req_id, prompt, p)
            order[req_id] = len(order)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.req_id in order:
                    results[order[out.req_id]] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return results  # type: ignore[return-value]

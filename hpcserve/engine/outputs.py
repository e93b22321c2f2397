"""What the engine hands back to callers after each step. No torch.

``LLMEngine.step()`` returns one ``RequestOutput`` per request that produced
something in that step (new text, or it finished). ``new_token_ids``/``new_text`` are
the deltas since the previous output for that request (what a stream sends);
``token_ids``/``text`` are cumulative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpcserve.engine.request import TokenLogprob


@dataclass
class RequestOutput:
    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

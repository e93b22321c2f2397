"""When a request's tokens were produced: the server's own TTFT and ITL per request. No torch, no grpc.

Interface::

    t = TokenTimes(arrival_time=time.time())   # the daemon received the request (unix seconds)
    t.add(token_time, num_tokens)              # each output with tokens: the engine's timestamp of the step
                                               # that sampled them (StepOutputs.token_time, unix seconds)
    t.as_dict() -> {"arrival_time", "first_token_time", "last_token_time", "ttft_s", "itl_mean_s", "itl_max_s"}

Times come from the engine (the end of the step that sampled the token), not from when a client
saw the token, so a client can check its own first chunk against ``first_token_time``. A step that
samples k tokens for one request counts k tokens at the same time (gaps of 0 after the first).
Arrival is the daemon's clock, token times the replica's: on a cluster they are different hosts,
so ``ttft_s`` carries their clock offset (NTP keeps it to milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenTimes:
    arrival_time: float
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    num_tokens: int = 0
    itl_sum_s: float = 0.0
    itl_max_s: float = 0.0

    def add(self, token_time: float, num_tokens: int = 1) -> None:
        if num_tokens <= 0 or token_time <= 0:
            return
        if self.num_tokens == 0:
            self.first_token_time = token_time
        else:
            gap = max(0.0, token_time - self.last_token_time)
            self.itl_sum_s += gap
            self.itl_max_s = max(self.itl_max_s, gap)
        self.last_token_time = token_time
        self.num_tokens += num_tokens

    @property
    def ttft_s(self) -> float:
        return max(0.0, self.first_token_time - self.arrival_time) if self.num_tokens else 0.0

    @property
    def itl_mean_s(self) -> float:
        return self.itl_sum_s / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                "last_token_time": self.last_token_time, "ttft_s": self.ttft_s,
                "itl_mean_s": self.itl_mean_s, "itl_max_s": self.itl_max_s}

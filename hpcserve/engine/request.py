"""Request state and sampling parameters. No torch.

Lifecycle of a ``Request`` (``status``):

    WAITING ──schedule──► RUNNING ──(eos | stop | max_tokens | length)──► FINISHED_*
       ▲                     │
       └──── PREEMPTED ◄─────┘   (blocks freed; recomputed from prompt + output so far)
    any state ──abort──► FINISHED_ABORTED

``num_computed_tokens`` counts tokens whose KV is in the cache; ``num_credited_tokens`` is the
high-water mark of the positions ever computed for the request, which preemption does not reset
(useful-work credit is earned once per position: ``hpcserve.engine.useful_work``). A step schedules
``num_new_tokens`` more (a prefill chunk, or 1 for decode); when a step reaches the
end of the known tokens the runner samples one new token, appended by
``Scheduler.update_from_output``.

Scheduling class (``priority``): an int, lower is more urgent. Two classes are
used: ``PRIORITY_INTERACTIVE`` (0, chat; the default) and ``PRIORITY_BATCH`` (1,
offline batch jobs), but any int works (e.g. -1 for something more urgent than
chat). The scheduler keeps ``waiting`` ordered by priority, then FCFS; serves
running requests in priority order; and lets a waiting request preempt running
ones of a strictly less urgent class (see ``hpcserve.engine.scheduler``).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from hpcserve.errors import RequestError

PRIORITY_INTERACTIVE = 0  # chat: served first, may preempt batch requests
PRIORITY_BATCH = 1  # offline batch: runs in whatever the interactive load leaves


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy.

    ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable those filters.
    ``logprobs=None`` returns none; ``logprobs=k`` returns the chosen token's logprob and
    the top ``k`` alternatives (k may be 0). ``seed`` makes a sampled request reproducible
    regardless of what else is in the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> RequestError:
            return RequestError(f"{name}: {why}", field=name)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0 or self.temperature > 100:
            raise bad("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", f"must be an integer (0 or -1 disables it), got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be a number in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            raise bad("stop", "must be a non-empty string or a list of at most 16 non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= self.MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


class Request:
    """One generation. Owned by the scheduler; the KV manager owns ``block_ids`` contents."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        priority: int = PRIORITY_INTERACTIVE,
        cache_salt: str = "",
    ) -> None:
        if not prompt_token_ids:
            raise RequestError("prompt: must contain at least one token", field="prompt")
        if not _is_int(priority):
            raise RequestError(f"priority: must be an integer, got {priority!r}", field="priority")
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority  # lower is more urgent; PRIORITY_INTERACTIVE / PRIORITY_BATCH
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.num_credited_tokens = 0  # high-water mark of computed positions (useful_work); never reset
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hash chain of this request's full blocks (kv_cache.chain_hash)
        self.cache_salt = cache_salt  # prefix-cache namespace: hits only blocks of the same salt
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None

    # token views ---------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, {self.status.name}, prio={self.priority}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})"
        )

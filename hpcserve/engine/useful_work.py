"""Useful work of one engine step: the seconds of it each scheduled request is credited with.
Pure Python: no torch. The one definition in code; docs/utilization.md explains it.

For each sequence ``i`` a step scheduled (``ScheduledSeq``: ``n_i`` tokens computed for it,
context ``ctx_i = context_len`` after the step) and the step-cost model's coefficients
``(a, b, c)`` (``engine/step_cost.py``: ``t ≈ a + b·tokens + c·context``)::

    cost_i   = b·n_i + c·ctx_i                       marginal model cost: the work at the rank's
                                                     calibrated peak, fixed per-step cost a excluded
    credit_i = cost_i · min(1, t / Σ_j cost_j) · fresh_i / n_i

``t`` is the step's measured wall time, so the credits of a step never sum to more than ``t``.
Before the model is calibrated (or when it has no marginal terms, ``b = c = 0``) the step's
time is split by token share instead, ``cost_i = n_i`` and scale ``t / Σ_j n_j``, as the
GPU-seconds metering does; still ``Σ credit_i ≤ t``.

``fresh_i``: the tokens of the chunk beyond the request's high-water mark
(``Request.num_credited_tokens``, the end of the furthest chunk ever computed for it). A token
position earns credit only the first time it is computed for that request: a request preempted
and recomputing its prompt and output, or recomputing what the prefix cache had lost, earns
nothing again. Steps still pay for recomputes: they are in ``Σ_j cost_j``.

Lifecycle, per step (``LLMEngine.step()``): after ``Scheduler.schedule()``, ``claim_fresh(seqs,
requests)`` works out ``fresh_i`` and advances the high-water marks (every scheduled request is
still known to the scheduler then); once the step is measured, ``step_credits(seqs, fresh,
step_time_s, coefficients)`` gives the credits in seconds, in ``seqs`` order. The worker sends
them to the daemon (``StepShare.useful_s``), which multiplies by the replica's ranks
(rank-seconds) and credits them to the request's tenant and class (``daemon/usage.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class _Seq(Protocol):  # engine.scheduler.ScheduledSeq
    req_id: str
    start_pos: int

    @property
    def num_new_tokens(self) -> int: ...

    @property
    def context_len(self) -> int: ...


def fresh_tokens(start_pos: int, num_tokens: int, high_water: int) -> int:
    """Tokens of the chunk ``[start_pos, start_pos + num_tokens)`` at or beyond ``high_water``."""
    end = start_pos + num_tokens
    return max(0, end - max(start_pos, high_water))


def claim_fresh(seqs: Sequence[_Seq], requests: Mapping[str, object]) -> list[int]:
    """Fresh tokens of each scheduled sequence; advances each request's ``num_credited_tokens``
    to the end of its chunk. A sequence whose request is unknown gets 0."""
    fresh = []
    for s in seqs:
        req = requests.get(s.req_id)
        if req is None:
            fresh.append(0)
            continue
        fresh.append(fresh_tokens(s.start_pos, s.num_new_tokens, req.num_credited_tokens))
        req.num_credited_tokens = max(req.num_credited_tokens, s.start_pos + s.num_new_tokens)
    return fresh


def step_credits(seqs: Sequence[_Seq], fresh: Sequence[int], step_time_s: float,
                 coefficients: tuple[float, float, float] | None) -> list[float]:
    """Credit in seconds of each sequence of one step (see the module docstring); their sum is
    at most ``step_time_s``."""
    if not seqs or not step_time_s > 0:
        return [0.0] * len(seqs)
    costs = None
    if coefficients is not None:
        _, b, c = coefficients
        costs = [b * s.num_new_tokens + c * s.context_len for s in seqs]
        total = sum(costs)
        scale = min(1.0, step_time_s / total) if total > 0 else None
        if scale is None:
            costs = None  # no marginal terms: fall back to token share
    if costs is None:
        costs = [float(s.num_new_tokens) for s in seqs]
        total = sum(costs)
        if total <= 0:
            return [0.0] * len(seqs)
        scale = step_time_s / total
    return [cost * scale * min(f, s.num_new_tokens) / s.num_new_tokens if s.num_new_tokens > 0 else 0.0
            for s, cost, f in zip(seqs, costs, fresh)]

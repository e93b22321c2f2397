"""Per-tenant usage metering in the daemon: requests, prompt/completion tokens and GPU-seconds.
No torch, no gRPC; everything runs on the daemon's event loop (the store write runs in a thread).

Interface
- ``UsageMeter(initial_tokens_today=None, wall=time.time)``: ``initial_tokens_today`` is the
  store's ``tokens_on(utc_day())`` at daemon start (tokens of today recorded by earlier runs);
  ``wall`` is the clock that decides the UTC day (``usage_store.utc_day``, re-exported here;
  tests inject a clock).
- ``on_step(shares, tenant_of, step_time_s, num_ranks=1)``: one engine step of one replica.
  Its GPU time ``step_time_s * num_ranks`` is split between the requests it scheduled by token
  share: request i with ``n_i`` of the step's ``sum(n)`` tokens gets ``step_time_s * num_ranks
  * n_i / sum(n)``, credited to its tenant (``tenant_of``: a mapping or a callable, request id ->
  tenant). Request ids with no known tenant (finished and forgotten by the router, or never
  routed) and a step with time but no token go to the tenant ``UNATTRIBUTED``, so the
  GPU-seconds recorded always sum to the replicas' step time x ranks.
- ``on_finished(tenant, prompt_tokens, completion_tokens)``: one request ended (the caller
  counts each request exactly once).
- ``tokens_today(tenant)``: prompt + completion tokens of the current UTC day (initial value +
  recorded since); starts again from 0 at UTC midnight.
- ``take_deltas()`` -> ``{(tenant, "YYYY-MM-DD"): {"requests", "input_tokens",
  "output_tokens", "gpu_seconds"}}`` accumulated since the last take (keyed by the UTC day each
  event happened), cleared; ``restore(deltas)`` adds them back after a failed store write.
- ``snapshot()`` -> ``{tenant: {"requests", "input_tokens", "output_tokens", "gpu_seconds",
  "tokens_today"}}`` since daemon start.

Lifecycle: the daemon builds one meter, hands it to the router and starts ``run_flusher(meter,
store)``, which every ``interval_s`` writes the deltas with ``store.add_usage(deltas)`` (one
transaction) and puts them back on failure; at shutdown it cancels the flusher (which lets a
write in progress end first) and awaits ``flush(meter, store)`` once more, so nothing recorded
is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from hpcserve.daemon.usage_store import utc_day

log = logging.getLogger("hpcserve.daemon")

UNATTRIBUTED = "(unattributed)"  # tenant of step time whose request is unknown to the router
FIELDS = ("requests", "input_tokens", "output_tokens", "gpu_seconds")

Deltas = dict[tuple[str, str], dict[str, float]]  # (tenant, UTC day "YYYY-MM-DD") -> amounts
__all__ = ["FIELDS", "UNATTRIBUTED", "UsageMeter", "flush", "run_flusher", "utc_day"]


def _zero() -> dict[str, float]:
    return {"requests": 0, "input_tokens": 0, "output_tokens": 0, "gpu_seconds": 0.0}


class UsageMeter:
    """See the module docstring."""

    def __init__(self, initial_tokens_today: Mapping[str, int] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._day = utc_day(wall())
        self._today: dict[str, int] = {t: int(n) for t, n in (initial_tokens_today or {}).items()}
        self._deltas: Deltas = {}
        self._totals: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ recording
    def _roll(self) -> str:
        """The current UTC day; the per-day token counts start again when it changes."""
        day = utc_day(self._wall())
        if day != self._day:
            self._day, self._today = day, {}
        return day

    def _add(self, tenant: str, day: str, **amounts: float) -> None:
        delta = self._deltas.setdefault((tenant, day), _zero())
        total = self._totals.setdefault(tenant, _zero())
        for k, v in amounts.items():
            delta[k] += v
            total[k] += v

    def on_step(self, shares: Iterable[tuple[str, int]], tenant_of: Mapping[str, str] | Callable[[str], str | None],
                step_time_s: float, num_ranks: int = 1) -> None:
        gpu_s = float(step_time_s) * max(1, int(num_ranks))
        if gpu_s <= 0:
            return
        lookup = tenant_of.get if isinstance(tenant_of, Mapping) else tenant_of
        tokens: dict[str, int] = {}
        for req_id, n in shares:
            if n > 0:
                tenant = lookup(req_id) or UNATTRIBUTED
                tokens[tenant] = tokens.get(tenant, 0) + int(n)
        total = sum(tokens.values())
        day = self._roll()
        if not total:
            self._add(UNATTRIBUTED, day, gpu_seconds=gpu_s)
            return
        for tenant, n in tokens.items():
            self._add(tenant, day, gpu_seconds=gpu_s * n / total)

    def on_finished(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        day = self._roll()
        self._add(tenant, day, requests=1, input_tokens=int(prompt_tokens), output_tokens=int(completion_tokens))
        self._today[tenant] = self._today.get(tenant, 0) + int(prompt_tokens) + int(completion_tokens)

    # ------------------------------------------------------------------ reading
    def tokens_today(self, tenant: str) -> int:
        self._roll()
        return self._today.get(tenant, 0)

    def take_deltas(self) -> Deltas:
        deltas, self._deltas = self._deltas, {}
        return deltas

    def restore(self, deltas: Deltas) -> None:
        """Put back deltas a store write did not take (they merge with any recorded since)."""
        for key, amounts in deltas.items():
            mine = self._deltas.setdefault(key, _zero())
            for k in FIELDS:
                mine[k] += amounts.get(k, 0)

    def snapshot(self) -> dict[str, dict]:
        self._roll()
        out = {}
        for tenant in sorted(set(self._totals) | set(self._today)):
            row = dict(self._totals.get(tenant) or _zero())
            row["tokens_today"] = self._today.get(tenant, 0)
            out[tenant] = row
        return out


# ---------------------------------------------------------------------- persistence
async def flush(meter: UsageMeter, store) -> bool:
    """Write the meter's deltas with ``store.add_usage`` (in a thread); on failure log and put them
    back. True when nothing is left to write."""
    deltas = meter.take_deltas()
    if not deltas:
        return True
    try:
        await asyncio.to_thread(store.add_usage, deltas)
    except Exception as exc:  # noqa: BLE001 - any store failure: keep the usage for the next flush
        meter.restore(deltas)
        log.warning("usage: cannot write %d tenant-day row(s) to the store (%s); kept for the next flush",
                    len(deltas), exc)
        return False
    return True


async def run_flusher(meter: UsageMeter, store, interval_s: float = 5.0) -> None:
    """Flush every ``interval_s`` until cancelled. A write in progress when it is cancelled is let
    finish (and put back if it fails) before the cancellation goes on, so a final ``flush`` after
    this task ends sees everything that was not written."""
    while True:
        await asyncio.sleep(interval_s)
        write = asyncio.ensure_future(flush(meter, store))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise

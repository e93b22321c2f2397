"""Per-tenant usage metering in the daemon: requests, prompt/completion tokens, GPU-seconds and
useful rank-seconds (economic utilization, docs/utilization.md). No torch, no gRPC; everything
runs on the daemon's event loop (the store write runs in a thread).

Interface
- ``UsageMeter(initial_tokens_today=None, wall=time.time)``: ``initial_tokens_today`` is the
  store's ``tokens_on(utc_day())`` at daemon start (tokens of today recorded by earlier runs);
  ``wall`` is the clock that decides the UTC day (``usage_store.utc_day``, re-exported here;
  tests inject a clock).
- ``Account(tenant, request_class)``: what one in-flight request has earned, kept by its owner
  (the router's ``Inflight``): its tenant, class (``INTERACTIVE`` or ``BATCH``) and the useful
  rank-seconds credited to it so far per replica (``useful_s``, replica id -> seconds).
- ``on_step(shares, account_of, step_time_s, num_ranks=1, replica_id=0)``: one engine step of
  one replica; ``shares`` are ``(request id, tokens computed, useful_s)`` (``StepShare``);
  ``account_of`` a mapping or callable, request id -> ``Account`` or None.
  - GPU-seconds: the step's ``step_time_s * num_ranks`` split by token share: request i with
    ``n_i`` of the step's ``sum(n)`` tokens gets ``step_time_s * num_ranks * n_i / sum(n)``,
    credited to its tenant. Request ids with no known account (finished and forgotten by the
    router, or never routed) and a step with time but no token go to ``UNATTRIBUTED``, so the
    GPU-seconds recorded always sum to the replicas' step time x ranks.
  - Useful seconds: each share's ``useful_s * num_ranks`` (the engine's credit,
    ``engine/useful_work.py``, at most the step's time in total) to the account's tenant and
    class, and to the account's ``useful_s[replica_id]``. A share of an unknown request earns
    nothing: its work cannot be delivered.
- ``debit(account, replica_id=None)``: the account's work was never delivered (a batch line
  requeued or given an error line; with ``replica_id``: only that replica's part, the prefill side
  of a failed KV handoff): takes what it earned back from its tenant and class, today, and zeroes
  it in the account. So every unit of work counts once, or not at all.
- ``on_finished(tenant, prompt_tokens, completion_tokens)``: one request ended (the caller
  counts each request exactly once).
- ``tokens_today(tenant)``: prompt + completion tokens of the current UTC day (initial value +
  recorded since); starts again from 0 at UTC midnight.
- ``take_deltas()`` -> ``{(tenant, "YYYY-MM-DD"): {FIELDS...}}`` accumulated since the last take
  (keyed by the UTC day each event happened; a debit may make a day's useful seconds negative),
  cleared; ``restore(deltas)`` adds them back after a failed store write.
- ``snapshot()`` -> ``{tenant: {FIELDS..., "tokens_today"}}`` since daemon start.
- ``totals()`` -> ``{FIELDS...}`` summed over tenants since daemon start (``gpu_seconds``: every
  step metered, ``UNATTRIBUTED`` included).

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
from dataclasses import dataclass, field

from hpcserve.daemon.usage_store import USAGE_KEYS, utc_day

log = logging.getLogger("hpcserve.daemon")

UNATTRIBUTED = "(unattributed)"  # tenant of step time whose request is unknown to the router
FIELDS = USAGE_KEYS  # requests, input/output tokens, gpu_seconds, useful_seconds_{interactive,batch}
INTERACTIVE, BATCH = "interactive", "batch"  # request classes of useful seconds

Deltas = dict[tuple[str, str], dict[str, float]]  # (tenant, UTC day "YYYY-MM-DD") -> amounts
__all__ = ["BATCH", "FIELDS", "INTERACTIVE", "UNATTRIBUTED", "Account", "UsageMeter", "flush", "run_flusher",
           "utc_day"]


def _zero() -> dict[str, float]:
    return {k: 0 if k in ("requests", "input_tokens", "output_tokens") else 0.0 for k in FIELDS}


def useful_key(request_class: str) -> str:
    """The usage field of a class's useful seconds."""
    return f"useful_seconds_{request_class}"


@dataclass
class Account:
    """What one in-flight request has earned (see the module docstring)."""

    tenant: str
    request_class: str = INTERACTIVE  # INTERACTIVE | BATCH
    useful_s: dict[int, float] = field(default_factory=dict)  # replica id -> useful rank-seconds credited

    def __post_init__(self) -> None:
        if self.request_class not in (INTERACTIVE, BATCH):
            raise ValueError(f"request_class must be {INTERACTIVE!r} or {BATCH!r}, got {self.request_class!r}")

    @property
    def total_s(self) -> float:
        return sum(self.useful_s.values())


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

    def on_step(self, shares: Iterable[tuple[str, int, float]],
                account_of: Mapping[str, Account] | Callable[[str], Account | None],
                step_time_s: float, num_ranks: int = 1, replica_id: int = 0) -> None:
        ranks = max(1, int(num_ranks))
        gpu_s = float(step_time_s) * ranks
        if gpu_s <= 0:
            return
        lookup = account_of.get if isinstance(account_of, Mapping) else account_of
        tokens: dict[str, int] = {}
        useful: dict[tuple[str, str], float] = {}
        for req_id, n, useful_s in shares:
            acct = lookup(req_id)
            tenant = acct.tenant if acct is not None else UNATTRIBUTED
            if n > 0:
                tokens[tenant] = tokens.get(tenant, 0) + int(n)
            if acct is not None and useful_s > 0:
                u = float(useful_s) * ranks
                acct.useful_s[replica_id] = acct.useful_s.get(replica_id, 0.0) + u
                key = (tenant, useful_key(acct.request_class))
                useful[key] = useful.get(key, 0.0) + u
        total = sum(tokens.values())
        day = self._roll()
        if not total:
            self._add(UNATTRIBUTED, day, gpu_seconds=gpu_s)
        for tenant, n in tokens.items():
            self._add(tenant, day, gpu_seconds=gpu_s * n / total)
        for (tenant, key), u in useful.items():
            self._add(tenant, day, **{key: u})

    def debit(self, account: Account, replica_id: int | None = None) -> float:
        """Take back what ``account`` earned (on ``replica_id`` only, if given); returns the
        rank-seconds debited."""
        ids = list(account.useful_s) if replica_id is None else [replica_id]
        amount = sum(account.useful_s.pop(i, 0.0) for i in ids)
        if amount:
            self._add(account.tenant, self._roll(), **{useful_key(account.request_class): -amount})
        return amount

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

    def totals(self) -> dict[str, float]:
        """Every field summed over the tenants, since daemon start."""
        out = _zero()
        for row in self._totals.values():
            for k in FIELDS:
                out[k] += row[k]
        return out

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

"""Per-tenant, per-UTC-day usage counters of the durable store: a mixin of ``BatchStore``. No torch.

Interface (methods of ``BatchStore``, table ``usage`` keyed ``(tenant, day)``):
``add_usage(deltas)`` adds ``{(tenant, day): {"requests": n, "input_tokens": n,
"output_tokens": n, "gpu_seconds": s, "useful_seconds_interactive": s, "useful_seconds_batch": s}}``
(any subset of ``USAGE_KEYS``; useful seconds may be negative: a debit, docs/utilization.md) in ONE
transaction (upsert: a new row starts at 0); ``usage(tenant=None, since_day=None, until_day=None)`` the rows
(``{"tenant", "day", *USAGE_KEYS}``, days inclusive) ordered by day, tenant;
``usage_totals(tenant=None, since_day=None) -> {tenant: {"tenant", *USAGE_KEYS}}`` sums over
days; ``tokens_on(day) -> {tenant: input_tokens + output_tokens}`` (for daily quotas). Module
function ``utc_day(ts=None) -> "YYYY-MM-DD"`` (UTC). Days are ``YYYY-MM-DD`` strings, so they
sort and compare as text.

Lifecycle: rows live as long as the state dir. The store adds exactly what it is given, each
call atomically; when to flush (and so how much a crash can lose) is the caller's choice.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

from hpcserve.errors import RequestError

USAGE_KEYS = ("requests", "input_tokens", "output_tokens", "gpu_seconds", "useful_seconds_interactive",
              "useful_seconds_batch")
_INT_KEYS = frozenset({"requests", "input_tokens", "output_tokens"})
_UPSERT = (f"INSERT INTO usage (tenant, day, {', '.join(USAGE_KEYS)}) VALUES (?,?{',?' * len(USAGE_KEYS)}) "
           "ON CONFLICT (tenant, day) DO UPDATE SET " + ", ".join(f"{k} = {k} + excluded.{k}" for k in USAGE_KEYS))
_SUMS = ", ".join(f"SUM({k}) AS {k}" for k in USAGE_KEYS)
_DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def utc_day(ts: float | None = None) -> str:
    """The UTC day of ``ts`` (default now) as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _check_day(value: object, field: str) -> str:
    if not isinstance(value, str) or not _DAY_RE.match(value):
        raise RequestError(f"{field}: must be a UTC day \"YYYY-MM-DD\", got {value!r}", field=field)
    return value


def _usage_dict(r: sqlite3.Row, with_day: bool = True) -> dict:
    d = {"tenant": r["tenant"]}
    if with_day:
        d["day"] = r["day"]
    d.update({k: int(r[k] or 0) for k in _INT_KEYS})
    d.update({k: float(r[k] or 0.0) for k in USAGE_KEYS if k not in _INT_KEYS})
    return {k: d[k] for k in ("tenant", "day", *USAGE_KEYS) if k in d}


class UsageStoreMixin:
    """Usage counters; see the module docstring. The store provides these attributes."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    _tx: Callable[[], AbstractContextManager[sqlite3.Connection]]

    def add_usage(self, deltas: Mapping[tuple[str, str], Mapping[str, float]]) -> None:
        """Add each ``(tenant, day)``'s counts (one transaction: all or nothing)."""
        rows = []
        for key, delta in deltas.items():
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and key[0]):
                raise ValueError(f"add_usage: keys must be (tenant, day) pairs, got {key!r}")
            tenant, day = key[0], _check_day(key[1], "day")
            unknown = set(delta) - set(USAGE_KEYS)
            if unknown:
                raise ValueError(f"add_usage: unknown usage key(s) {sorted(unknown)} for {key!r}; "
                                 f"use {', '.join(USAGE_KEYS)}")
            rows.append((tenant, day, *(int(delta.get(k, 0)) if k in _INT_KEYS else float(delta.get(k, 0.0))
                                        for k in USAGE_KEYS)))
        if not rows:
            return
        with self._tx() as db:
            db.executemany(_UPSERT, rows)

    def _usage_where(self, tenant: str | None, since_day: str | None,
                     until_day: str | None = None) -> tuple[str, list]:
        sql, args = " WHERE 1=1", []
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        if since_day is not None:
            sql += " AND day >= ?"
            args.append(_check_day(since_day, "since_day"))
        if until_day is not None:
            sql += " AND day <= ?"
            args.append(_check_day(until_day, "until_day"))
        return sql, args

    def usage(self, tenant: str | None = None, since_day: str | None = None,
              until_day: str | None = None) -> list[dict]:
        """Per tenant and day rows, ``since_day`` .. ``until_day`` inclusive, by day then tenant."""
        where, args = self._usage_where(tenant, since_day, until_day)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM usage{where} ORDER BY day, tenant", args).fetchall()
        return [_usage_dict(r) for r in rows]

    def usage_totals(self, tenant: str | None = None, since_day: str | None = None) -> dict[str, dict]:
        """Sums over the days from ``since_day`` (inclusive), per tenant."""
        where, args = self._usage_where(tenant, since_day)
        with self._lock:
            rows = self._db.execute(
                f"SELECT tenant, {_SUMS} FROM usage{where} GROUP BY tenant ORDER BY tenant", args).fetchall()
        return {r["tenant"]: _usage_dict(r, with_day=False) for r in rows}

    def tokens_on(self, day: str) -> dict[str, int]:
        """Input + output tokens per tenant on one UTC day (tenants with a row that day)."""
        _check_day(day, "day")
        with self._lock:
            rows = self._db.execute("SELECT tenant, input_tokens + output_tokens FROM usage WHERE day = ?",
                                    (day,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

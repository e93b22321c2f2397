"""Schema and row helpers of the durable batch store (``hpcserve.daemon.batches``). No torch.

Interface (re-exported by ``batches``): ``SCHEMA_VERSION``, ``SCHEMA`` (the SQLite DDL),
``STATUSES``, ``TERMINAL``, ``TIMESTAMPS``, ``BatchNotFound``, ``ClaimedLine``,
``migrate(db)``, ``parse_completion_window(window) -> seconds``, ``line_usage(line_dict, is_error) ->
(prompt_tokens, completion_tokens)`` and ``row_to_dict(row) -> dict`` (a ``batches`` row as
an OpenAI Batch object plus ``tenant``). Pure functions and constants; the store owns the DB.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass

from hpcserve.batch.openai_format import BatchItem, parse_line
from hpcserve.errors import HpcserveError, RequestError

SCHEMA_VERSION = 1  # nothing deployed yet: the schema still changes in place
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelling",
            "cancelled", "expired")
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
TIMESTAMPS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
              "cancelling_at", "cancelled_at", "expires_at", "expired_at")
_WINDOW_RE = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# lines.done_seq: 1, 2, ... per batch in the order results were stored (validation errors
# first), so readers can follow a running batch with a cursor.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    endpoint TEXT, status TEXT NOT NULL, target TEXT, completion_window TEXT NOT NULL,
    metadata TEXT, errors TEXT, input_file TEXT,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    expires_at INTEGER NOT NULL, expired_at INTEGER, output_file TEXT, error_file TEXT);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status, expires_at, seq);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT, raw TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    attempts INTEGER NOT NULL DEFAULT 0, is_error INTEGER, result TEXT, done_seq INTEGER,
    PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_state ON lines(state, batch_id, line_no);
CREATE INDEX IF NOT EXISTS lines_done ON lines(batch_id, is_error, line_no);
CREATE INDEX IF NOT EXISTS lines_done_seq ON lines(batch_id, done_seq);
"""


_ADDED_COLUMNS = (("batches", "input_file", "TEXT"), ("batches", "input_tokens", "INTEGER NOT NULL DEFAULT 0"),
                  ("batches", "output_tokens", "INTEGER NOT NULL DEFAULT 0"), ("lines", "done_seq", "INTEGER"))


def migrate(db: sqlite3.Connection) -> None:
    """Add the columns a development DB of the first schema lacks (usage counts start at 0;
    results stored before get done_seq = line_no). Run inside a transaction, before SCHEMA."""
    for table, column, ddl in _ADDED_COLUMNS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if have and column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
            if column == "done_seq":
                db.execute("UPDATE lines SET done_seq = line_no WHERE state = 'done'")


class BatchNotFound(HpcserveError):
    """No batch with this id in the store."""

    def __init__(self, batch_id: str):
        super().__init__(f"batch not found: {batch_id!r}")
        self.batch_id = batch_id


@dataclass(frozen=True)
class ClaimedLine:
    """A line handed to the daemon to run; report it with ``record_result`` or ``requeue``."""

    batch_id: str
    line_no: int
    custom_id: str
    raw: str
    attempts: int  # times claimed, this claim included
    tenant: str

    def parse(self) -> BatchItem:
        """The validated request (the line passed validation when the batch was created)."""
        return parse_line(self.raw, self.line_no)


def parse_completion_window(window: str) -> int:
    """``"24h"`` -> seconds; also ``s``/``m``/``d`` units."""
    m = _WINDOW_RE.match(window) if isinstance(window, str) else None
    if m is None:
        raise RequestError(f"completion_window: must look like \"24h\" (number + s/m/h/d), "
                           f"got {window!r}", field="completion_window")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _count(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def line_usage(line_dict: object, is_error: bool) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of an output line's ``response.body.usage``;
    (0, 0) for error lines and lines without usage."""
    if is_error or not isinstance(line_dict, dict):
        return 0, 0
    usage: object = line_dict
    for key in ("response", "body", "usage"):
        usage = usage.get(key) if isinstance(usage, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def row_to_dict(r: sqlite3.Row) -> dict:
    """A ``batches`` row as an OpenAI Batch object (plus ``tenant``)."""
    d = {k: r[k] for k in ("id", "endpoint", "input_file", "completion_window", "status", "output_file",
                           "error_file", *TIMESTAMPS, "tenant")}
    d.update(object="batch", errors=json.loads(r["errors"] or "null"),
             metadata=json.loads(r["metadata"] or "null"),
             request_counts={"total": r["total"], "completed": r["completed"], "failed": r["failed"]},
             usage={"input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"],
                    "total_tokens": r["input_tokens"] + r["output_tokens"]})
    return d

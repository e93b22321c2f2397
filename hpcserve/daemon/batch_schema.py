"""Schema and row helpers of the durable batch store (``hpcserve.daemon.batches``). No torch.

Interface (re-exported by ``batches``): ``SCHEMA_VERSION``, ``SCHEMA`` (the SQLite DDL),
``STATUSES``, ``TERMINAL``, ``TIMESTAMPS``, ``BatchNotFound``, ``ClaimedLine``,
``migrate(db)``, ``parse_completion_window(window) -> seconds``, ``line_usage(line_dict, is_error) ->
(prompt_tokens, completion_tokens)``, ``store_lines(db, batch_id, f, endpoint) -> (total, bad,
endpoint, first_errors)`` (parse an input file into ``lines`` rows, inside the caller's
transaction) and ``row_to_dict(row) -> dict`` (a ``batches`` row as
an OpenAI Batch object plus ``tenant`` and the ``input_file_id`` / ``output_file_id`` /
``error_file_id`` of its file objects). ``SCHEMA`` also holds the ``files`` table (OpenAI File
objects, ``hpcserve.daemon.files``) and the ``usage`` table (per tenant and UTC day,
``hpcserve.daemon.usage_store``). Functions and constants; the store owns the DB and its transactions.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import BinaryIO

from hpcserve.batch.openai_format import BatchItem, BatchLineError, LineParser, build_error_line, parse_line
from hpcserve.config_tables import window_seconds
from hpcserve.errors import HpcserveError, RequestError

SCHEMA_VERSION = 1  # nothing deployed yet: the schema still changes in place
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelling",
            "cancelled", "expired")
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
TIMESTAMPS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
              "cancelling_at", "cancelled_at", "expires_at", "expired_at")
MAX_BATCH_ERRORS = 10  # line errors copied into batch.errors when the whole file fails

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
    expires_at INTEGER NOT NULL, expired_at INTEGER, output_file TEXT, error_file TEXT,
    input_file_id TEXT, output_file_id TEXT, error_file_id TEXT);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status, expires_at, seq);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT, raw TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    attempts INTEGER NOT NULL DEFAULT 0, is_error INTEGER, result TEXT, done_seq INTEGER,
    PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_state ON lines(state, batch_id, line_no);
CREATE INDEX IF NOT EXISTS lines_done ON lines(batch_id, is_error, line_no);
CREATE INDEX IF NOT EXISTS lines_done_seq ON lines(batch_id, done_seq);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    path TEXT NOT NULL, batch_id TEXT, status TEXT NOT NULL DEFAULT 'processed',
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS files_tenant ON files(tenant, deleted, seq);
CREATE INDEX IF NOT EXISTS files_batch ON files(batch_id, path);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0, useful_seconds_interactive REAL NOT NULL DEFAULT 0,
    useful_seconds_batch REAL NOT NULL DEFAULT 0, PRIMARY KEY (tenant, day));
"""


_ADDED_COLUMNS = (("batches", "input_file", "TEXT"), ("batches", "input_tokens", "INTEGER NOT NULL DEFAULT 0"),
                  ("batches", "output_tokens", "INTEGER NOT NULL DEFAULT 0"), ("lines", "done_seq", "INTEGER"),
                  ("batches", "input_file_id", "TEXT"), ("batches", "output_file_id", "TEXT"),
                  ("batches", "error_file_id", "TEXT"),
                  ("usage", "useful_seconds_interactive", "REAL NOT NULL DEFAULT 0"),
                  ("usage", "useful_seconds_batch", "REAL NOT NULL DEFAULT 0"))


def migrate(db: sqlite3.Connection) -> None:
    """Add the columns a DB of an earlier schema lacks (usage counts and useful seconds start at 0;
    results stored before get done_seq = line_no; batches stored before have no file ids).
    New tables come from ``SCHEMA``'s ``IF NOT EXISTS``. Run inside a transaction, before SCHEMA."""
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
    seconds = window_seconds(window)
    if seconds is None:
        raise RequestError(f"completion_window: must look like \"24h\" (number + s/m/h/d), "
                           f"got {window!r}", field="completion_window")
    return seconds


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


def store_lines(db: sqlite3.Connection, batch_id: str, f: BinaryIO,
                endpoint: str | None) -> tuple[int, int, str | None, list[dict]]:
    """Store each non-blank line of ``f`` (one ``lines`` row each): valid ones ``pending``,
    bad ones (or a url other than ``endpoint``, which defaults to the first line's) ``done``
    with their error line. Returns ``(total, bad, endpoint, first MAX_BATCH_ERRORS errors)``."""
    parser = LineParser()
    total = bad = 0
    first_errors: list[dict] = []
    rows: list[tuple] = []

    def flush() -> None:
        db.executemany("INSERT INTO lines (batch_id, line_no, custom_id, raw, state, is_error, "
                       "result, done_seq) VALUES (?,?,?,?,?,?,?,?)", rows)
        rows.clear()

    for line_no, raw in enumerate(f, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and not text.strip():
            continue
        total += 1
        try:
            if text is None:
                raise BatchLineError(line_no, None, "invalid_json", "line is not valid UTF-8")
            item = parser.parse(text, line_no)
            endpoint = endpoint or item.url
            if item.url != endpoint:
                raise BatchLineError(line_no, item.custom_id, "invalid_url",
                                     f"url: this batch's endpoint is {endpoint}; got {item.url!r}")
            rows.append((batch_id, line_no, item.custom_id, text.rstrip("\r\n"), "pending",
                         None, None, None))
        except BatchLineError as exc:
            bad += 1
            if len(first_errors) < MAX_BATCH_ERRORS:
                first_errors.append({"code": exc.code, "message": exc.message, "param": None,
                                     "line": line_no})
            line = build_error_line(exc.custom_id, line_no, exc.code, exc.message)
            rows.append((batch_id, line_no, exc.custom_id, None, "done", 1,
                         json.dumps(line, ensure_ascii=False), bad))
        if len(rows) >= 1000:
            flush()
    flush()
    return total, bad, endpoint, first_errors


def row_to_dict(r: sqlite3.Row) -> dict:
    """A ``batches`` row as an OpenAI Batch object (plus ``tenant``; file ids None when unset)."""
    d = {k: r[k] for k in ("id", "endpoint", "input_file", "completion_window", "status", "output_file",
                           "error_file", *TIMESTAMPS, "tenant", "input_file_id", "output_file_id",
                           "error_file_id")}
    d.update(object="batch", errors=json.loads(r["errors"] or "null"),
             metadata=json.loads(r["metadata"] or "null"),
             request_counts={"total": r["total"], "completed": r["completed"], "failed": r["failed"]},
             usage={"input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"],
                    "total_tokens": r["input_tokens"] + r["output_tokens"]})
    return d

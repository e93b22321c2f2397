"""Durable batch store for the daemon: OpenAI-shaped Batch objects in SQLite. No torch.

Interface: ``BatchStore(state_dir)`` (``state_dir/batches.sqlite``, WAL, synchronous=FULL)
with ``create_batch``, ``get_batch``, ``list_batches``, ``results`` (output lines then error
lines, in line order, from the DB; ``result_rows`` the same as ``(custom_id, json_text,
is_error)``; ``result_rows_after(id, seq)`` in the order stored, to follow a running batch),
``cancel_batch``, ``check_expired``; for the daemon's scheduler ``claim_lines``,
``record_result``, ``requeue``, ``requeue_all_running``, and ``recover()`` once at start.
Unknown ids raise ``BatchNotFound``; so does another tenant's batch when a call passes
``tenant=`` (``None``: no filter, for internal callers and admins). ONE process per state dir.
Schema, ``ClaimedLine`` and row helpers live in ``batch_schema``; the store also holds File
objects (``files.FileStoreMixin``: ``create_file``, ``get_file``, ``list_files``,
``file_path``, ``delete_file``; ``create_batch(..., input_file_id=)``) and per-tenant daily
usage (``usage_store.UsageStoreMixin``: ``add_usage``, ``usage``, ``usage_totals``,
``tokens_on``). Batch dicts are OpenAI Batch objects plus ``tenant``; ``input_file`` is the
input path (absolute) or the stored copy ``batches/<id>/input.jsonl`` of inline input (which
gets a file row of its own, so ``input_file_id`` is set unless the input was a bare path),
and ``usage`` sums ``response.body.usage`` of the output lines stored so far (``record_result``
adds it in the same transaction; error lines add nothing).

Lifecycle. ``create_batch`` commits the batch as ``validating``, then in ONE transaction
stores every non-blank line and moves it to ``in_progress``: valid lines ``pending`` (raw
text, re-parsed by ``ClaimedLine.parse()``), bad ones (``LineParser``, or a url other than
the batch's ``endpoint``) ``done`` with their error line, counted ``failed``. Empty file:
``failed`` (``empty_file``); every line bad: ``failed``, errors.jsonl still written. Lines
go ``pending -> running`` (``claim_lines``: in_progress batches only, earliest ``expires_at``
first) ``-> done`` (``record_result``); ``requeue`` puts a running line back. Last line done:
``finalizing -> completed``. ``cancel_batch``: ``cancelling`` (no more claims; running lines
may still report) ``-> cancelled`` once none is running; ``check_expired``: ``finalizing ->
expired`` the same way. The terminal status is committed only after
``state_dir/batches/<id>/{output,errors}.jsonl`` are written from the DB in line order to
``*.tmp``, fsynced, renamed into place and the directory fsynced. ``output_file`` /
``error_file``: those paths, None when empty; the same transaction registers each non-empty
one as a ``batch_output`` file of the batch's tenant (``output_file_id`` / ``error_file_id``;
re-finalizing reuses the rows). ``total`` counts non-blank input lines; a
cancelled/expired batch has ``completed + failed < total`` (unrun lines are in no file).

Exactly once. Each input line is one row keyed (batch_id, line_no). ``record_result`` turns
it done and bumps the counts in ONE transaction: the first result wins (a repeat returns
False) and the counts always equal the done rows. A crash leaves a line pending, running
(``recover`` makes it pending) or done: never lost. The files are never appended to; they
are a deterministic function of the done rows (one line each), written only when no row of
the batch can change any more (all done, or closing with nothing running: claims stop and
results for lines not running are refused), and ``recover`` rewrites them whole if the kill
came before the terminal status was committed. So after any kill, reopen + ``recover()``
gives the same files, each line exactly once across output + errors (and so each custom_id,
except that a repeated custom_id in the input yields a ``duplicate_custom_id`` error line).
``claim_lines(exclude_tenants=)`` leaves those tenants' lines pending (e.g. daily quota used).

Concurrency: one connection behind a lock (threads may share a store); writes use ``BEGIN
IMMEDIATE``; finalization runs inline in the call that closes a batch. Only one process may
use a state dir at a time (``recover`` requeues ITS running lines); the dir needs a filesystem
where SQLite WAL works (local disk, or one host's view). ``HPCSERVE_TEST_FINALIZE_PAUSE="tmp:SECS"`` or
``"renamed:SECS"`` (tests only) announces ``finalize window <phase>`` on stderr and sleeps
after the temp files are written / after they are renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hpcserve.daemon.batch_schema import (
    SCHEMA,
    SCHEMA_VERSION,
    STATUSES,
    TERMINAL,
    TIMESTAMPS,
    BatchNotFound,
    ClaimedLine,
    line_usage,
    migrate,
    parse_completion_window,
    row_to_dict,
    store_lines,
)
from hpcserve.daemon.files import FileNotFound, FileStoreMixin
from hpcserve.daemon.state_dir import fsync_dir, lock_state_dir, test_pause
from hpcserve.daemon.usage_store import UsageStoreMixin, utc_day
from hpcserve.errors import HpcserveError, RequestError

DEADLINE_BUCKET_S = 300  # claim_lines: deadlines this close count as equal (fair share between them)


__all__ = ["SCHEMA", "SCHEMA_VERSION", "STATUSES", "TERMINAL", "TIMESTAMPS", "BatchNotFound", "BatchStore",
           "ClaimedLine", "FileNotFound", "parse_completion_window", "utc_day"]


class BatchStore(FileStoreMixin, UsageStoreMixin):
    """See the module docstring."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        try:
            (self.state_dir / "batches").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HpcserveError(f"cannot create state directory {self.state_dir}: {exc}") from None
        self.db_path = self.state_dir / "batches.sqlite"
        self._dir_lock = lock_state_dir(self.state_dir / "lock")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise HpcserveError(f"{self.db_path}: SQLite WAL mode unavailable (got {mode!r}); "
                                "put the state directory on a local filesystem")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._tx() as db:
            migrate(db)
            for stmt in filter(str.strip, SCHEMA.split(";")):
                db.execute(stmt)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            found = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if int(found) != SCHEMA_VERSION:
            raise HpcserveError(f"{self.db_path} has schema version {found}, this hpcserve "
                                f"expects {SCHEMA_VERSION}; use a matching hpcserve or a new state dir")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._dir_lock.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, batch_id: str, tenant: str | None = None) -> sqlite3.Row:
        """The batch's row; unknown, or another tenant's when ``tenant`` is given: BatchNotFound."""
        row = self._db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise BatchNotFound(batch_id)
        return row

    # ------------------------------------------------------------------ batches

    def create_batch(self, jsonl: bytes | str | os.PathLike | BinaryIO, completion_window: str = "24h",
                     metadata: dict | None = None, tenant: str = "default",
                     endpoint: str | None = None, input_file_id: str | None = None,
                     input_name: str | None = None, quota_bytes: int = 0) -> dict:
        """Validate and store a batch input file (bytes, or a path: with ``input_file_id``, the
        ``file_path`` of that file of the tenant's; or a binary file object the caller opened, named
        ``input_name`` in the batch object); return the batch object. Inline bytes are kept as a file
        of the tenant's and count against ``quota_bytes`` (0 = unlimited; ``StorageQuotaExceeded``)."""
        window_s = parse_completion_window(completion_window)
        if metadata is not None and not isinstance(metadata, dict):
            raise RequestError("metadata: must be an object of string keys and values", field="metadata")
        if input_file_id is not None:
            with self._lock:
                purpose = self._file_row(input_file_id, tenant)["purpose"]
            if purpose != "batch":
                raise RequestError(f"input_file_id: file {input_file_id!r} has purpose {purpose!r}; upload the "
                                   "batch input with purpose \"batch\"", field="input_file_id")
        batch_id = "batch_" + os.urandom(16).hex()
        out_dir = self.state_dir / "batches" / batch_id
        new_file = None  # (filename, bytes) of a file row to register for inline input
        if isinstance(jsonl, (bytes, bytearray)):
            if quota_bytes and input_file_id is None:  # early, before writing its copy (checked again when stored)
                with self._lock:
                    self._check_quota(self._db, tenant, quota_bytes, len(jsonl))
            f, input_file = io.BytesIO(bytes(jsonl)), out_dir / "input.jsonl"
            new_file = ("input.jsonl", len(jsonl)) if input_file_id is None else None
        elif callable(getattr(jsonl, "read", None)):
            f, input_file = jsonl, Path(input_name or "input.jsonl")
        else:
            try:
                f = open(jsonl, "rb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise HpcserveError(f"cannot read batch input {jsonl}: {exc}") from None
            input_file = Path(jsonl).absolute()
        now = int(time.time())
        with self._lock, f:
            with self._tx() as db:
                db.execute("INSERT INTO batches (id, tenant, endpoint, status, completion_window, "
                           "metadata, input_file, input_file_id, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (batch_id, tenant, endpoint, "validating", completion_window,
                            json.dumps(metadata) if metadata is not None else None, str(input_file),
                            input_file_id, now, now + window_s))
            try:
                if isinstance(f, io.BytesIO):  # keep a copy of inline input (informational)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    input_file.with_name("input.jsonl.tmp").write_bytes(f.getbuffer())
                    os.replace(input_file.with_name("input.jsonl.tmp"), input_file)
                self._validate(batch_id, f, endpoint, now,
                               new_file and (tenant, *new_file, input_file.absolute()), quota_bytes)
            except BaseException:  # e.g. a read error: the caller gets no batch, drop it
                with self._tx() as db:
                    db.execute("DELETE FROM batches WHERE id=?", (batch_id,))
                    db.execute("DELETE FROM lines WHERE batch_id=?", (batch_id,))
                    db.execute("DELETE FROM files WHERE batch_id=?", (batch_id,))
                shutil.rmtree(out_dir, ignore_errors=True)
                raise
            self._maybe_close(batch_id)
            return self.get_batch(batch_id)

    def _validate(self, batch_id: str, f: io.BufferedIOBase, endpoint: str | None, now: int,
                  new_file: tuple[str, str, int, Path] | None, quota_bytes: int = 0) -> None:
        with self._tx() as db:
            if new_file is not None:  # (tenant, filename, bytes, path) of the stored inline input
                tenant, name, nbytes, path = new_file
                self._check_quota(db, tenant, quota_bytes, nbytes)
                file_id = self._register_file(db, tenant, "batch", name, nbytes, path, batch_id=batch_id)
                db.execute("UPDATE batches SET input_file_id=? WHERE id=?", (file_id, batch_id))
            total, bad, endpoint, first_errors = store_lines(db, batch_id, f, endpoint)
            if total == 0:
                errors = [{"code": "empty_file", "message": "the input file has no requests "
                           "(no non-blank lines)", "param": None, "line": None}]
                status, stamp = "failed", "failed_at"
            elif bad == total:
                errors, status, stamp = first_errors, "finalizing", "finalizing_at"
            else:
                errors, status, stamp = None, "in_progress", "in_progress_at"
            db.execute(f"UPDATE batches SET status=?, target=?, endpoint=?, total=?, failed=?, "
                       f"errors=?, {stamp}=? WHERE id=?",
                       (status, "failed" if status == "finalizing" else None, endpoint, total,
                        bad, json.dumps({"object": "list", "data": errors}) if errors else None,
                        now, batch_id))

    def get_batch(self, batch_id: str, tenant: str | None = None) -> dict:
        with self._lock:
            return row_to_dict(self._row(batch_id, tenant))

    def list_batches(self, limit: int = 20, after: str | None = None,
                     tenant: str | None = None) -> list[dict]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        sql, args = "SELECT * FROM batches WHERE 1=1", []
        with self._lock:
            if after is not None:
                sql += " AND seq < ?"
                args.append(self._row(after, tenant)["seq"])
            if tenant is not None:
                sql += " AND tenant = ?"
                args.append(tenant)
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, int(limit))).fetchall()
            return [row_to_dict(r) for r in rows]

    def results(self, batch_id: str, tenant: str | None = None) -> Iterator[dict]:
        """Output lines then error lines stored so far, each in line order (from the DB)."""
        with self._lock:
            self._row(batch_id, tenant)
        return self._iter_results(batch_id)

    def _iter_results(self, batch_id: str, page: int = 500) -> Iterator[dict]:
        for is_error in (0, 1):
            yield from (json.loads(s) for s in self._iter_result_text(batch_id, is_error, page))

    def result_rows(self, batch_id: str, tenant: str | None = None) -> Iterator[tuple[str | None, str, bool]]:
        """Like ``results`` (the files' order), as ``(custom_id, json_text, is_error)``."""
        with self._lock:
            self._row(batch_id, tenant)
        return ((r["custom_id"], r["result"], bool(e)) for e in (0, 1)
                for r in self._iter_result_text(batch_id, e, rows=True))

    def result_rows_after(self, batch_id: str, after_seq: int = 0, limit: int = 500,
                          tenant: str | None = None) -> list[tuple[int, str | None, str, bool]]:
        """Results in the order they were stored, ``(seq, custom_id, json_text, is_error)``
        with ``seq > after_seq``: pass the last seq seen to follow a running batch."""
        with self._lock:
            self._row(batch_id, tenant)
            rows = self._db.execute(
                "SELECT done_seq, custom_id, result, is_error FROM lines WHERE batch_id=? AND done_seq>? "
                "AND state='done' ORDER BY done_seq LIMIT ?", (batch_id, int(after_seq), int(limit))).fetchall()
        return [(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def _iter_result_text(self, batch_id: str, is_error: int, page: int = 500, rows: bool = False) -> Iterator:
        last = -1
        while True:
            with self._lock:
                got = self._db.execute(
                    "SELECT line_no, custom_id, result FROM lines WHERE batch_id=? AND is_error=? AND line_no>? "
                    "AND state='done' ORDER BY line_no LIMIT ?", (batch_id, is_error, last, page)).fetchall()
            if not got:
                return
            for r in got:
                yield r if rows else r["result"]
            last = got[-1]["line_no"]

    # ------------------------------------------------------------------ scheduling

    def claim_lines(self, limit: int, batch_id: str | None = None,
                    exclude_tenants: Collection[str] = ()) -> list[ClaimedLine]:
        """Mark up to ``limit`` pending lines of in-progress batches running and return them.
        Batches of ``exclude_tenants`` are skipped (their lines stay pending).

        Order: earliest deadline first (``expires_at``, in buckets of ``DEADLINE_BUCKET_S`` so
        batches submitted minutes apart with the same window count as equal); within a bucket,
        fair share: each next line goes to the batch with the fewest lines done or running so
        far (ties: the older batch), so equal-deadline jobs advance together; within a batch,
        line order."""
        out: list[ClaimedLine] = []
        excluded = sorted(set(exclude_tenants))
        skip = f" AND tenant NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        with self._tx() as db:
            if batch_id is not None:
                self._row(batch_id)
                batches = db.execute("SELECT id, tenant, expires_at, completed + failed AS served FROM batches "
                                     f"WHERE id=? AND status='in_progress'{skip}", (batch_id, *excluded)).fetchall()
            else:
                batches = db.execute("SELECT id, tenant, expires_at, completed + failed AS served FROM batches "
                                     f"WHERE status='in_progress'{skip} ORDER BY expires_at, seq", excluded).fetchall()
            running = dict(db.execute("SELECT batch_id, COUNT(*) FROM lines WHERE state='running' "
                                      "GROUP BY batch_id").fetchall())
            groups: dict[int, list] = {}
            for b in batches:
                groups.setdefault(int(b["expires_at"] or 0) // DEADLINE_BUCKET_S, []).append(b)
            for _, group in sorted(groups.items()):
                if len(out) >= limit:
                    break
                queues = {}
                for b in group:
                    rows = db.execute("SELECT line_no, custom_id, raw, attempts FROM lines WHERE "
                                      "state='pending' AND batch_id=? ORDER BY line_no LIMIT ?",
                                      (b["id"], limit - len(out))).fetchall()
                    if rows:
                        queues[b["id"]] = [b, b["served"] + running.get(b["id"], 0), rows, 0]
                while queues and len(out) < limit:
                    q = min(queues.values(), key=lambda q: q[1])  # fewest served; dict order = older first
                    b, _, rows, i = q
                    r = rows[i]
                    out.append(ClaimedLine(b["id"], r["line_no"], r["custom_id"], r["raw"], r["attempts"] + 1,
                                           b["tenant"]))
                    q[1] += 1
                    q[3] += 1
                    if q[3] == len(rows):
                        del queues[b["id"]]
            db.executemany("UPDATE lines SET state='running', attempts=attempts+1 WHERE batch_id=? AND line_no=?",
                           [(c.batch_id, c.line_no) for c in out])
        return out

    def record_result(self, batch_id: str, line_no: int, line_dict: dict, is_error: bool) -> bool:
        """Store the result line of one input line. The first result wins: returns False (and
        changes nothing) if the line already has one, or if it is not running and its batch
        no longer takes results (cancelling, expiring, finished)."""
        text = json.dumps(line_dict, ensure_ascii=False)
        with self._tx() as db:
            row = db.execute("SELECT l.state, l.custom_id, b.status FROM lines l JOIN batches b "
                             "ON b.id = l.batch_id WHERE l.batch_id=? AND l.line_no=?",
                             (batch_id, line_no)).fetchone()
            if row is None:
                self._row(batch_id)
                raise HpcserveError(f"batch {batch_id!r} has no request on line {line_no}")
            if row["state"] == "done" or (row["state"] != "running" and row["status"] != "in_progress"):
                return False
            cid = line_dict.get("custom_id", row["custom_id"]) if isinstance(line_dict, dict) else None
            if cid != row["custom_id"]:
                raise HpcserveError(f"result for batch {batch_id!r} line {line_no} has custom_id "
                                    f"{cid!r}, the line's is {row['custom_id']!r}")
            seq = db.execute("SELECT COALESCE(MAX(done_seq), 0) + 1 FROM lines WHERE batch_id=?",
                             (batch_id,)).fetchone()[0]
            db.execute("UPDATE lines SET state='done', is_error=?, result=?, done_seq=? WHERE batch_id=? "
                       "AND line_no=?", (int(bool(is_error)), text, seq, batch_id, line_no))
            prompt, completion = line_usage(line_dict, is_error)
            db.execute("UPDATE batches SET completed=completed+?, failed=failed+?, input_tokens="
                       "input_tokens+?, output_tokens=output_tokens+? WHERE id=?",
                       (0 if is_error else 1, 1 if is_error else 0, prompt, completion, batch_id))
        self._maybe_close(batch_id)
        return True

    def requeue(self, batch_id: str, line_no: int) -> bool:
        """A running line goes back to pending (preempted, worker died). False if not running."""
        with self._tx() as db:
            self._row(batch_id)
            n = db.execute("UPDATE lines SET state='pending' WHERE batch_id=? AND line_no=? AND "
                           "state='running'", (batch_id, line_no)).rowcount
        self._maybe_close(batch_id)
        return n == 1

    def requeue_all_running(self) -> int:
        """Every running line goes back to pending (daemon start). Returns how many."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT DISTINCT batch_id FROM lines WHERE state='running'")]
            n = db.execute("UPDATE lines SET state='pending' WHERE state='running'").rowcount
        for batch_id in ids:
            self._maybe_close(batch_id)
        return n

    def cancel_batch(self, batch_id: str, tenant: str | None = None) -> dict:
        """Stop claiming the batch's lines; it becomes ``cancelled`` (files written with the
        results so far) once none is running. No-op for a finalizing or finished batch."""
        with self._tx() as db:
            if self._row(batch_id, tenant)["status"] == "in_progress":
                db.execute("UPDATE batches SET status='cancelling', target='cancelled', "
                           "cancelling_at=? WHERE id=?", (int(time.time()), batch_id))
        self._maybe_close(batch_id)
        return self.get_batch(batch_id)

    def check_expired(self, now: float | None = None) -> list[str]:
        """In-progress batches past ``expires_at`` stop being claimed and become ``expired``
        (via ``finalizing``) once none of their lines is running. Returns their ids."""
        now = int(time.time() if now is None else now)
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM batches WHERE status='in_progress' "
                                            "AND expires_at <= ?", (now,))]
            db.executemany("UPDATE batches SET status='finalizing', target='expired', "
                           "finalizing_at=?, expired_at=? WHERE id=?", [(now, now, i) for i in ids])
        for batch_id in ids:
            self._maybe_close(batch_id)
        return ids

    def recover(self) -> None:
        """After a restart: fail batches whose validation was interrupted, requeue running
        lines, finish every batch that can be finished (rewriting files if needed), and remove
        uploads a crash left without a row."""
        now = int(time.time())
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM batches WHERE status='validating'")]
            for batch_id in ids:
                db.execute("DELETE FROM lines WHERE batch_id=?", (batch_id,))
                err = {"object": "list", "data": [{"code": "validation_interrupted", "message":
                       "the server restarted while validating this batch; submit it again",
                       "param": None, "line": None}]}
                db.execute("UPDATE batches SET status='failed', failed_at=?, errors=?, total=0, "
                           "completed=0, failed=0 WHERE id=?", (now, json.dumps(err), batch_id))
        self.requeue_all_running()
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE status IN ('in_progress', 'finalizing', 'cancelling') "
                "ORDER BY seq")]
        for batch_id in ids:
            self._maybe_close(batch_id)
        self._sweep_files()

    # ------------------------------------------------------------------ finalization

    def _maybe_close(self, batch_id: str) -> None:
        """Move a batch on if it can: in_progress with every line done -> finalizing;
        finalizing/cancelling with no running line -> files written -> terminal status."""
        with self._lock:
            with self._tx() as db:
                row = self._row(batch_id)
                status = row["status"]
                if status == "in_progress" and row["completed"] + row["failed"] >= row["total"]:
                    db.execute("UPDATE batches SET status='finalizing', target='completed', "
                               "finalizing_at=? WHERE id=?", (int(time.time()), batch_id))
                    status = "finalizing"
                if status not in ("finalizing", "cancelling") or db.execute(
                        "SELECT 1 FROM lines WHERE state='running' AND batch_id=? LIMIT 1",
                        (batch_id,)).fetchone():
                    return
            self._finalize(batch_id, status)

    def _finalize(self, batch_id: str, status: str) -> None:
        """Write both files from the DB (tmp, fsync, rename, fsync dir), then commit the
        terminal status. Called with the lock held and no line of the batch running."""
        out_dir = self.state_dir / "batches" / batch_id
        out_dir.mkdir(parents=True, exist_ok=True)
        paths, counts = {}, {}
        for is_error, name in ((0, "output.jsonl"), (1, "errors.jsonl")):
            path = out_dir / name
            n = 0
            with open(path.with_name(name + ".tmp"), "w", encoding="utf-8") as f:
                for text in self._iter_result_text(batch_id, is_error):
                    f.write(text + "\n")
                    n += 1
                f.flush()
                os.fsync(f.fileno())
            paths[is_error], counts[is_error] = path, n
        test_pause("tmp")
        for path in paths.values():
            os.replace(path.with_name(path.name + ".tmp"), path)
        fsync_dir(out_dir)
        test_pause("renamed")
        with self._tx() as db:
            row = self._row(batch_id)
            if row["status"] != status:
                return
            target = row["target"] or "completed"
            out, err = (paths[0] if counts[0] else None), (paths[1] if counts[1] else None)
            out_id, err_id = self._register_batch_outputs(db, row, out, err)
            db.execute(f"UPDATE batches SET status=?, {target}_at=COALESCE({target}_at, ?), output_file=?, "
                       "error_file=?, output_file_id=?, error_file_id=? WHERE id=?",
                       (target, int(time.time()), out and str(out), err and str(err), out_id, err_id, batch_id))

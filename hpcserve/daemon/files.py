"""File objects (OpenAI ``/v1/files``) of the durable store: a mixin of ``BatchStore``. No torch.

Interface (methods of ``BatchStore``; ``tenant=None`` means no tenant filter, for internal
callers and admins):
``create_file(data, filename, purpose, tenant) -> dict`` (``data``: bytes or a binary file
object, read in ``CHUNK_BYTES`` chunks; purposes a client may upload: ``UPLOAD_PURPOSES``; at
most ``MAX_FILE_BYTES``), ``get_file(file_id, tenant=None) -> dict``, ``list_files(tenant=None,
purpose=None, limit=10000, after=None, order="desc") -> list[dict]``, ``file_path(file_id,
tenant=None) -> Path`` (where the bytes are, for download), ``delete_file(file_id, tenant=None)
-> {"id", "object": "file", "deleted": True}``. An unknown, deleted or other tenant's id raises
``FileNotFound`` (never revealing that it exists). File dicts are OpenAI File objects
(``file_to_dict``). For the batch store: ``_register_file`` (a batch's inline input),
``_register_batch_outputs`` (output/error files, inside the transaction that commits the
batch's terminal status; re-finalizing reuses the rows) and ``_sweep_files`` (``recover``).

Lifecycle. Uploads live in ``state_dir/files/<id>``: the bytes go to ``<id>.tmp`` (fsynced)
OUTSIDE the store lock, then the row is inserted and the tmp renamed into place (dir fsynced)
in one transaction, so a crash leaves at most an orphan file without a row, which
``_sweep_files`` (run by ``recover()`` at start, before any upload) removes. Batch files
(``batch_id`` set: a batch's inline ``input.jsonl``, its ``output.jsonl`` / ``errors.jsonl``)
stay under ``state_dir/batches/<batch_id>/``. ``delete_file`` marks the row deleted, then
removes an upload's bytes (a batch that used it as input keeps working: its lines are in the
DB); a batch file's bytes are kept (the batch's ``*_file`` paths still name them). ``filename``
is metadata only (directories stripped), never part of a path.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from hpcserve.daemon.state_dir import fsync_dir
from hpcserve.errors import HpcserveError, RequestError

FILE_PURPOSES = ("batch", "batch_output", "user_data", "assistants", "fine-tune", "vision", "evals")
UPLOAD_PURPOSES = ("batch", "user_data")  # what clients may upload here
MAX_FILE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1 << 20
MAX_FILENAME_CHARS = 255
_UPLOAD_NAME_RE = re.compile(r"^file-[0-9a-f]{24}(\.tmp)?$")


class StorageQuotaExceeded(HpcserveError):
    """Storing more would take a tenant over its ``tenants.NAME.storage-quota-gb``
    (RESOURCE_EXHAUSTED / HTTP 413)."""

    code = "resource_exhausted"
    http_status = 413

    def __init__(self, tenant: str, quota_bytes: int, used_bytes: int, adding_bytes: int | None = None):
        more = f" and this file needs {adding_bytes} more" if adding_bytes is not None else ""
        super().__init__(f"tenant {tenant} stores {used_bytes} bytes of files{more}, over its quota "
                         f"(tenants.{tenant}.storage-quota-gb = {quota_bytes / 2**30:g} GiB); delete files it no "
                         "longer needs (DELETE /v1/files/ID) or ask the site admin to raise the quota")
        self.tenant, self.quota_bytes, self.used_bytes = tenant, quota_bytes, used_bytes


class FileNotFound(HpcserveError):
    """No (live) file with this id for this tenant."""

    def __init__(self, file_id: str):
        super().__init__(f"file not found: {file_id!r}")
        self.file_id = file_id


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def clean_filename(name: object) -> str:
    """The last path component of a client's file name (metadata only, never a path)."""
    if not isinstance(name, str):
        raise RequestError(f"filename: must be a string such as \"input.jsonl\", got {type(name).__name__}",
                           field="filename")
    base = "".join(ch for ch in re.split(r"[/\\]", name)[-1] if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        raise RequestError(f"filename: give the file a name such as \"input.jsonl\" (got {name[:80]!r})",
                           field="filename")
    return base[:MAX_FILENAME_CHARS]


def file_to_dict(r: sqlite3.Row) -> dict:
    """A ``files`` row as an OpenAI File object."""
    return {"id": r["id"], "object": "file", "bytes": r["bytes"], "created_at": r["created_at"],
            "filename": r["filename"], "purpose": r["purpose"], "status": r["status"],
            "status_details": None, "expires_at": None}


def _too_large() -> RequestError:
    return RequestError(f"file: larger than the limit of {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES / 2**20:g} MiB); "
                        "split it into smaller files", field="file")


def _write_upload(data: bytes | bytearray | memoryview | BinaryIO, tmp: Path,
                  too_large: Callable[[int], Exception | None]) -> int:
    """Write ``data`` to ``tmp`` (chunked, fsynced); return its size. ``too_large(size)`` returns the
    error to raise once ``size`` bytes are more than may be stored (checked as the bytes come)."""
    size = 0
    with open(tmp, "xb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            size = len(data)
            if (err := too_large(size)) is not None:
                raise err
            f.write(data)
        else:
            while chunk := data.read(CHUNK_BYTES):
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError("create_file: data must be bytes or a file object opened in binary mode")
                size += len(chunk)
                if (err := too_large(size)) is not None:
                    raise err
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return size


class FileStoreMixin:
    """File objects; see the module docstring. The store provides these attributes."""

    state_dir: Path
    _db: sqlite3.Connection
    _lock: threading.RLock
    _tx: Callable[[], AbstractContextManager[sqlite3.Connection]]

    @property
    def _files_dir(self) -> Path:
        return (self.state_dir / "files").absolute()

    def _file_row(self, file_id: str, tenant: str | None = None) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM files WHERE id=? AND deleted=0", (str(file_id),)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise FileNotFound(str(file_id))
        return row

    def stored_bytes(self, tenant: str) -> int:
        """Bytes of the tenant's live uploads and inline batch inputs (what its storage quota counts;
        the daemon's own batch output files are not counted)."""
        with self._lock:
            return self._stored_bytes(self._db, tenant)

    @staticmethod
    def _stored_bytes(db: sqlite3.Connection, tenant: str) -> int:
        marks = ",".join("?" * len(UPLOAD_PURPOSES))
        return int(db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant=? AND deleted=0 AND "
                              f"purpose IN ({marks})", (tenant, *UPLOAD_PURPOSES)).fetchone()[0])

    def _check_quota(self, db: sqlite3.Connection, tenant: str, quota_bytes: int, adding: int) -> None:
        """Raise ``StorageQuotaExceeded`` if ``adding`` more bytes take ``tenant`` over ``quota_bytes``
        (0 = unlimited); inside the transaction that stores them, so concurrent uploads cannot both pass."""
        if quota_bytes:
            used = self._stored_bytes(db, tenant)
            if used + adding > quota_bytes:
                raise StorageQuotaExceeded(tenant, quota_bytes, used, adding)

    def create_file(self, data: bytes | BinaryIO, filename: str, purpose: str, tenant: str,
                    quota_bytes: int = 0) -> dict:
        """Store an uploaded file; return its File object. ``quota_bytes`` (0 = unlimited): the most
        the tenant may store in all (``StorageQuotaExceeded``; the upload stops as soon as it is over)."""
        if purpose not in UPLOAD_PURPOSES:
            accepted = ", ".join(f'"{p}"' for p in UPLOAD_PURPOSES)
            why = "cannot be uploaded here" if purpose in FILE_PURPOSES else "is not a file purpose"
            raise RequestError(f"purpose: {purpose!r} {why}; use one of {accepted}", field="purpose")
        if not isinstance(tenant, str) or not tenant:
            raise RequestError("tenant: required (a non-empty string)", field="tenant")
        if not isinstance(data, (bytes, bytearray, memoryview)) and not callable(getattr(data, "read", None)):
            raise TypeError("create_file: data must be bytes or a file object opened in binary mode")
        name = clean_filename(filename)
        folder = self._files_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HpcserveError(f"cannot create the file store {folder}: {exc}") from None
        file_id = new_file_id()
        path, tmp = folder / file_id, folder / (file_id + ".tmp")
        left = quota_bytes - self.stored_bytes(tenant) if quota_bytes else None

        def too_large(size: int) -> Exception | None:
            if size > MAX_FILE_BYTES:
                return _too_large()
            if left is not None and size > left:
                return StorageQuotaExceeded(tenant, quota_bytes, quota_bytes - left, size)
            return None
        try:
            size = _write_upload(data, tmp, too_large)  # outside the lock: uploads may be large
            with self._tx() as db:
                self._check_quota(db, tenant, quota_bytes, size)  # again: another upload may have landed
                db.execute("INSERT INTO files (id, tenant, purpose, filename, bytes, created_at, path, status) "
                           "VALUES (?,?,?,?,?,?,?,'processed')",
                           (file_id, tenant, purpose, name, size, int(time.time()), str(path)))
                os.replace(tmp, path)
                fsync_dir(folder)
        except BaseException as exc:  # no row was committed: drop the bytes
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise HpcserveError(f"cannot store the uploaded file {name!r} in {folder}: {exc}") from None
            raise
        return self.get_file(file_id)

    def get_file(self, file_id: str, tenant: str | None = None) -> dict:
        with self._lock:
            return file_to_dict(self._file_row(file_id, tenant))

    def file_path(self, file_id: str, tenant: str | None = None) -> Path:
        """Where the file's bytes are (absolute)."""
        with self._lock:
            return Path(self._file_row(file_id, tenant)["path"])

    def list_files(self, tenant: str | None = None, purpose: str | None = None, limit: int = 10000,
                   after: str | None = None, order: str = "desc") -> list[dict]:
        """Live files by creation order (``desc``: newest first); ``after`` is the id of the
        last file of the previous page."""
        if order not in ("asc", "desc"):
            raise RequestError(f"order: must be \"asc\" or \"desc\", got {order!r}", field="order")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RequestError(f"limit: must be a positive integer, got {limit!r}", field="limit")
        sql, args = "SELECT * FROM files WHERE deleted=0", []
        with self._lock:
            if after is not None:
                row = self._db.execute("SELECT seq, tenant FROM files WHERE id=?", (str(after),)).fetchone()
                if row is None or (tenant is not None and row["tenant"] != tenant):
                    raise FileNotFound(str(after))
                sql += " AND seq < ?" if order == "desc" else " AND seq > ?"
                args.append(row["seq"])
            if tenant is not None:
                sql += " AND tenant = ?"
                args.append(tenant)
            if purpose is not None:
                sql += " AND purpose = ?"
                args.append(purpose)
            rows = self._db.execute(f"{sql} ORDER BY seq {order.upper()} LIMIT ?", (*args, limit)).fetchall()
        return [file_to_dict(r) for r in rows]

    def delete_file(self, file_id: str, tenant: str | None = None) -> dict:
        """Mark the file deleted; an upload's bytes are removed (a batch's files are kept)."""
        with self._tx() as db:
            row = self._file_row(file_id, tenant)
            db.execute("UPDATE files SET deleted=1 WHERE id=?", (row["id"],))
        path = Path(row["path"])
        if row["batch_id"] is None and path.parent == self._files_dir:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # the row is gone; _sweep_files retries at the next start
        return {"id": row["id"], "object": "file", "deleted": True}

    # ------------------------------------------------------------------ for the batch store

    def _register_file(self, db: sqlite3.Connection, tenant: str, purpose: str, filename: str,
                       nbytes: int, path: Path, batch_id: str | None = None) -> str:
        """Insert a file row for bytes already in place (inside the caller's transaction)."""
        file_id = new_file_id()
        db.execute("INSERT INTO files (id, tenant, purpose, filename, bytes, created_at, path, batch_id, status) "
                   "VALUES (?,?,?,?,?,?,?,?,'processed')",
                   (file_id, tenant, purpose, filename, int(nbytes), int(time.time()), str(Path(path).absolute()),
                    batch_id))
        return file_id

    def _register_batch_outputs(self, db: sqlite3.Connection, batch: sqlite3.Row, output: Path | None,
                                errors: Path | None) -> tuple[str | None, str | None]:
        """File rows (purpose ``batch_output``, the batch's tenant) for the batch's non-empty
        output / error files; an existing row for the same file is reused with its size
        updated. Returns ``(output_file_id, error_file_id)``."""
        got: list[str | None] = []
        for kind, path in (("output", output), ("error", errors)):
            if path is None:
                got.append(None)
                continue
            path = Path(path).absolute()
            nbytes = path.stat().st_size
            row = db.execute("SELECT id FROM files WHERE batch_id=? AND path=?", (batch["id"], str(path))).fetchone()
            if row is not None:
                db.execute("UPDATE files SET bytes=? WHERE id=?", (nbytes, row["id"]))
                got.append(row["id"])
            else:
                got.append(self._register_file(db, batch["tenant"], "batch_output", f"{batch['id']}_{kind}.jsonl",
                                               nbytes, path, batch_id=batch["id"]))
        return got[0], got[1]

    def _sweep_files(self) -> int:
        """Remove upload temp files and uploads without a live row (a crash mid-upload or
        mid-delete). Only at start, before any upload. Returns how many were removed."""
        folder = self._files_dir
        if not folder.is_dir():
            return 0
        with self._lock:
            live = {r[0] for r in self._db.execute("SELECT id FROM files WHERE deleted=0 AND batch_id IS NULL")}
        n = 0
        for entry in folder.iterdir():
            if _UPLOAD_NAME_RE.match(entry.name) and entry.name not in live and entry.is_file():
                entry.unlink(missing_ok=True)
                n += 1
        return n

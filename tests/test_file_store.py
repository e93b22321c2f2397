"""hpcserve.daemon.files through BatchStore: OpenAI File objects (uploads, batch inputs and
outputs), tenant isolation, size limit, crash leftovers, and migration of an old-schema DB.
Real SQLite and real files; the test plays the daemon with fake result lines."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path
from typing import ClassVar

import pytest

from hpcserve.batch.openai_format import build_error_line
from hpcserve.daemon import files as files_mod
from hpcserve.daemon.batches import BatchStore, ClaimedLine, FileNotFound
from hpcserve.errors import HpcserveError, RequestError

CHAT = "/v1/chat/completions"
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at"}


def req(cid: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT,
                       "body": {"messages": [{"role": "user", "content": f"hi {cid}"}]}})


def fake_output(c: ClaimedLine) -> dict:
    return {"id": f"batch_req_{c.line_no}", "custom_id": c.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{c.line_no}",
                         "body": {"object": "chat.completion", "line": c.line_no}}, "error": None}


@pytest.fixture
def store(tmp_path):
    s = BatchStore(tmp_path / "state")
    yield s
    s.close()


def file_rows(state_dir, batch_id) -> list[tuple]:
    db = sqlite3.connect(state_dir / "batches.sqlite")
    try:
        return db.execute("SELECT id, purpose, bytes FROM files WHERE batch_id=? ORDER BY seq", (batch_id,)).fetchall()
    finally:
        db.close()


def run_all(store, batch_id, error_lines=()) -> dict:
    """Answer every line of the batch (lines in ``error_lines`` with an error line)."""
    while claimed := store.claim_lines(3, batch_id=batch_id):
        for c in claimed:
            if c.line_no in error_lines:
                line, err = build_error_line(c.custom_id, c.line_no, "context_length_exceeded", "long"), True
            else:
                line, err = fake_output(c), False
            assert store.record_result(batch_id, c.line_no, line, err)
    return store.get_batch(batch_id)


def test_create_get_list_delete_and_tenants(tmp_path, store):
    before = int(time.time())
    a1 = store.create_file(b"one\n", "a1.jsonl", "batch", "alice")
    on_disk = tmp_path / "upload.jsonl"
    on_disk.write_bytes(b"x" * 3000)
    with open(on_disk, "rb") as f:
        a2 = store.create_file(f, "a2.txt", "user_data", "alice")
    b1 = store.create_file(io.BytesIO(b"bee"), "b1.jsonl", "batch", "bob")
    a3 = store.create_file(bytearray(b"three"), "a3.jsonl", "batch", "alice")

    assert set(a1) == FILE_KEYS and a1["object"] == "file" and a1["id"].startswith("file-") and len(a1["id"]) == 29
    assert (a1["bytes"], a1["filename"], a1["purpose"], a1["status"]) == (4, "a1.jsonl", "batch", "processed")
    assert a1["status_details"] is None and a1["expires_at"] is None and before <= a1["created_at"] <= time.time()
    assert (a2["bytes"], b1["bytes"], a3["bytes"]) == (3000, 3, 5)
    assert store.get_file(a2["id"], tenant="alice") == a2 and store.get_file(a2["id"]) == a2
    path = store.file_path(a2["id"], "alice")
    assert path.is_absolute() and path.read_bytes() == on_disk.read_bytes()
    assert path == (store.state_dir / "files" / a2["id"]).absolute()

    ids = lambda rows: [r["id"] for r in rows]
    assert ids(store.list_files("alice")) == [a3["id"], a2["id"], a1["id"]]  # newest first
    assert ids(store.list_files()) == [a3["id"], b1["id"], a2["id"], a1["id"]]
    assert ids(store.list_files("alice", purpose="user_data")) == [a2["id"]]
    assert ids(store.list_files("alice", limit=1, after=a3["id"])) == [a2["id"]]
    assert ids(store.list_files("alice", after=a2["id"])) == [a1["id"]]
    assert ids(store.list_files("alice", order="asc", after=a1["id"])) == [a2["id"], a3["id"]]
    assert store.list_files("alice")[0] == a3

    # another tenant's file is indistinguishable from an unknown one
    for call in (lambda: store.get_file(a1["id"], "bob"), lambda: store.file_path(a1["id"], "bob"),
                 lambda: store.delete_file(a1["id"], "bob"), lambda: store.list_files("bob", after=a1["id"]),
                 lambda: store.get_file("file-000000000000000000000000")):
        with pytest.raises(FileNotFound) as exc:
            call()
        assert exc.value.file_id in (a1["id"], "file-000000000000000000000000")
    assert store.get_file(a1["id"], "alice") == a1  # the failed delete changed nothing

    assert store.delete_file(a2["id"], "alice") == {"id": a2["id"], "object": "file", "deleted": True}
    assert not path.exists()  # an upload's bytes go
    for call in (lambda: store.get_file(a2["id"]), lambda: store.file_path(a2["id"]),
                 lambda: store.delete_file(a2["id"], "alice")):
        with pytest.raises(FileNotFound):
            call()
    assert ids(store.list_files("alice")) == [a3["id"], a1["id"]]
    assert ids(store.list_files("alice", after=a2["id"])) == [a1["id"]]  # a deleted cursor still pages
    with pytest.raises(RequestError, match="order"):
        store.list_files(order="newest")
    with pytest.raises(RequestError, match="limit"):
        store.list_files(limit=0)


def test_purpose_filename_and_size_limit(store, monkeypatch):
    for purpose in ("fine-tune", "batch_output", "nonsense", None):
        with pytest.raises(RequestError) as exc:
            store.create_file(b"x", "x.jsonl", purpose, "alice")
        assert exc.value.field == "purpose" and '"batch", "user_data"' in str(exc.value)
    f = store.create_file(b"x", "../../etc/passwd", "user_data", "alice")
    assert f["filename"] == "passwd" and store.file_path(f["id"]).name == f["id"]
    assert store.create_file(b"x", "C:\\Users\\me\\in.jsonl", "batch", "alice")["filename"] == "in.jsonl"
    for bad in ("", "dir/", "..", 7):
        with pytest.raises(RequestError) as exc:
            store.create_file(b"x", bad, "batch", "alice")
        assert exc.value.field == "filename"

    class Recording(io.BytesIO):
        sizes: ClassVar[list[int]] = []

        def read(self, n=-1):
            self.sizes.append(n)
            return super().read(n)

    monkeypatch.setattr(files_mod, "MAX_FILE_BYTES", 10)
    monkeypatch.setattr(files_mod, "CHUNK_BYTES", 4)
    before = sorted(p.name for p in (store.state_dir / "files").iterdir())
    for data in (b"x" * 11, Recording(b"y" * 11)):
        with pytest.raises(RequestError, match="limit of 10 bytes") as exc:
            store.create_file(data, "big.jsonl", "batch", "alice")
        assert exc.value.field == "file"
    assert Recording.sizes and all(0 < n <= 4 for n in Recording.sizes)  # streamed in chunks
    ok = store.create_file(Recording(b"z" * 10), "fits.jsonl", "batch", "alice")
    assert ok["bytes"] == 10 and store.file_path(ok["id"]).read_bytes() == b"z" * 10
    after = sorted(p.name for p in (store.state_dir / "files").iterdir())
    assert after == sorted([*before, ok["id"]])  # rejected uploads left nothing behind


def test_failed_upload_and_crash_leftovers(tmp_path, store):
    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell():
                raise OSError("connection reset")
            return super().read(n)

    with pytest.raises(HpcserveError, match="connection reset"):
        store.create_file(Broken(b"a" * (3 << 20)), "x.jsonl", "batch", "alice")
    folder = store.state_dir / "files"
    assert list(folder.iterdir()) == [] and store.list_files() == []

    live = store.create_file(b"keep", "k.jsonl", "batch", "alice")
    gone = store.create_file(b"gone", "g.jsonl", "batch", "alice")
    store.close()
    # leftovers of a kill: a half-written upload, an upload renamed but never committed,
    # and the bytes of a file whose delete committed just before the kill
    (folder / "file-0123456789abcdef01234567.tmp").write_bytes(b"half")
    (folder / "file-89abcdef0123456789abcdef").write_bytes(b"uncommitted")
    db = sqlite3.connect(tmp_path / "state" / "batches.sqlite")
    db.execute("UPDATE files SET deleted=1 WHERE id=?", (gone["id"],))
    db.commit()
    db.close()
    (folder / "notes.txt").write_text("not ours")
    s2 = BatchStore(tmp_path / "state")
    try:
        s2.recover()
        assert sorted(p.name for p in folder.iterdir()) == sorted([live["id"], "notes.txt"])
        assert s2.file_path(live["id"]).read_bytes() == b"keep" and s2.get_file(live["id"]) == live
    finally:
        s2.close()


def test_batch_from_file_id_and_output_files(tmp_path, store):
    lines = [req("a"), "{broken", req("b"), req("c")]
    up = store.create_file(("\n".join(lines) + "\n").encode(), "in.jsonl", "batch", "alice")
    with pytest.raises(FileNotFound):  # bob cannot use alice's file
        store.create_batch(store.file_path(up["id"]), tenant="bob", input_file_id=up["id"])
    data = store.create_file(b"{}", "d.json", "user_data", "alice")
    with pytest.raises(RequestError) as exc:
        store.create_batch(store.file_path(data["id"]), tenant="alice", input_file_id=data["id"])
    assert exc.value.field == "input_file_id" and "purpose" in str(exc.value)

    b = store.create_batch(store.file_path(up["id"], "alice"), tenant="alice", input_file_id=up["id"])
    assert b["input_file_id"] == up["id"] and b["input_file"] == str(store.file_path(up["id"]))
    assert b["output_file_id"] is None and b["error_file_id"] is None
    store.delete_file(up["id"], "alice")  # the batch's lines are already in the DB
    done = run_all(store, b["id"], error_lines={3})
    assert done["status"] == "completed" and done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}

    out, err = store.get_file(done["output_file_id"], "alice"), store.get_file(done["error_file_id"], "alice")
    assert (out["purpose"], out["filename"]) == ("batch_output", f"{b['id']}_output.jsonl")
    assert (err["purpose"], err["filename"]) == ("batch_output", f"{b['id']}_error.jsonl")
    out_bytes = Path(done["output_file"]).read_bytes()
    assert out["bytes"] == len(out_bytes) and store.file_path(out["id"], "alice").read_bytes() == out_bytes
    assert store.file_path(err["id"]).read_bytes() == Path(done["error_file"]).read_bytes()
    assert [json.loads(x)["custom_id"] for x in out_bytes.splitlines()] == ["a", "c"]
    with pytest.raises(FileNotFound):
        store.get_file(out["id"], "bob")
    assert {f["id"] for f in store.list_files("alice", purpose="batch_output")} == {out["id"], err["id"]}
    assert store.list_files("bob") == []
    rows = file_rows(store.state_dir, b["id"])
    assert [r[0] for r in rows] == [out["id"], err["id"]]

    # reopen: nothing changes; a lost terminal commit re-finalizes onto the same file rows
    store.close()
    s2 = BatchStore(tmp_path / "state")
    s2.recover()
    assert s2.get_batch(b["id"]) == done and file_rows(s2.state_dir, b["id"]) == rows
    s2.close()
    db = sqlite3.connect(tmp_path / "state" / "batches.sqlite")
    db.execute("UPDATE batches SET status='finalizing', completed_at=NULL WHERE id=?", (b["id"],))
    db.execute("UPDATE files SET bytes=0 WHERE batch_id=?", (b["id"],))  # as if the sizes were stale
    db.commit()
    db.close()
    s3 = BatchStore(tmp_path / "state")
    try:
        s3.recover()
        again = s3.get_batch(b["id"])
        assert again["status"] == "completed"
        assert (again["output_file_id"], again["error_file_id"]) == (out["id"], err["id"])
        assert file_rows(s3.state_dir, b["id"]) == rows  # no duplicates, sizes rewritten
        assert s3.file_path(out["id"], "alice").read_bytes() == out_bytes
    finally:
        s3.close()


def test_inline_and_path_input(tmp_path, store):
    data = ("\n".join(req(f"r{i}") for i in range(3)) + "\n").encode()
    b = store.create_batch(data, tenant="t1")
    f = store.get_file(b["input_file_id"], "t1")
    assert (f["filename"], f["purpose"], f["bytes"]) == ("input.jsonl", "batch", len(data))
    assert str(store.file_path(f["id"])) == b["input_file"] and store.file_path(f["id"]).read_bytes() == data
    assert store.list_files("t1") == [f]
    done = run_all(store, b["id"])
    assert done["output_file_id"] is not None and done["error_file_id"] is None and done["error_file"] is None
    assert store.get_file(done["output_file_id"], "t1")["bytes"] == len(Path(done["output_file"]).read_bytes())
    store.delete_file(f["id"], "t1")  # a batch's own files keep their bytes (the batch names them)
    assert Path(b["input_file"]).read_bytes() == data

    failed = store.create_batch(b"{x\n", tenant="t2")  # every line bad: only an error file
    assert failed["status"] == "failed" and failed["output_file_id"] is None
    assert store.get_file(failed["error_file_id"], "t2")["filename"] == f"{failed['id']}_error.jsonl"
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    assert store.create_batch(path, tenant="t1")["input_file_id"] is None  # a bare path is not a file object


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    endpoint TEXT, status TEXT NOT NULL, target TEXT, completion_window TEXT NOT NULL,
    metadata TEXT, errors TEXT, input_file TEXT,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    expires_at INTEGER NOT NULL, expired_at INTEGER, output_file TEXT, error_file TEXT);
CREATE INDEX batches_status ON batches(status, expires_at, seq);
CREATE TABLE lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT, raw TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    attempts INTEGER NOT NULL DEFAULT 0, is_error INTEGER, result TEXT, done_seq INTEGER,
    PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX lines_state ON lines(state, batch_id, line_no);
CREATE INDEX lines_done ON lines(batch_id, is_error, line_no);
CREATE INDEX lines_done_seq ON lines(batch_id, done_seq);
"""


def test_old_schema_db_opens_and_works(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "batches.sqlite")
    db.executescript(OLD_SCHEMA)
    now = int(time.time())
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO batches (id, tenant, endpoint, status, completion_window, total, created_at, "
               "in_progress_at, expires_at) VALUES ('batch_old', 'alice', ?, 'in_progress', '24h', 2, ?, ?, ?)",
               (CHAT, now, now, now + 86400))
    db.executemany("INSERT INTO lines (batch_id, line_no, custom_id, raw, state) VALUES ('batch_old', ?, ?, ?, "
                   "'pending')", [(1, "o1", req("o1")), (2, "o2", req("o2"))])
    db.commit()
    db.close()

    store = BatchStore(state)
    try:
        store.recover()
        old = store.get_batch("batch_old", tenant="alice")
        assert old["status"] == "in_progress"
        assert (old["input_file_id"], old["output_file_id"], old["error_file_id"]) == (None, None, None)
        done = run_all(store, "batch_old")
        assert done["status"] == "completed" and store.get_file(done["output_file_id"], "alice")["bytes"] > 0
        up = store.create_file(req("n1").encode(), "n.jsonl", "batch", "alice")
        b = store.create_batch(store.file_path(up["id"]), tenant="alice", input_file_id=up["id"])
        assert run_all(store, b["id"])["status"] == "completed"
        store.add_usage({("alice", "2024-01-01"): {"requests": 1}})
        assert store.usage("alice")[0]["requests"] == 1
    finally:
        store.close()

"""hpcserve.daemon.batches.BatchStore: lifecycle, scheduling, cancel/expiry, crash safety
with real SIGKILLs. No torch, no model: the test plays the daemon with fake result lines."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpcserve.batch.openai_format import build_error_line
from hpcserve.daemon.batches import BatchNotFound, BatchStore, ClaimedLine

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
REPO = Path(__file__).resolve().parent.parent


def req(cid, url=CHAT, **body) -> str:
    body = ({"messages": [{"role": "user", "content": f"hi {cid}"}]} if url == CHAT
            else {"prompt": f"hi {cid}"}) | body
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def fake_output(c: ClaimedLine) -> dict:
    return {"id": f"batch_req_{c.line_no}", "custom_id": c.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{c.line_no}",
                         "body": {"object": "chat.completion", "line": c.line_no}}, "error": None}


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


def ids(lines) -> list:
    return [x["custom_id"] for x in lines]


@pytest.fixture
def store(tmp_path):
    s = BatchStore(tmp_path / "state")
    yield s
    s.close()


def simple_batch(store, n, **kw) -> dict:
    return store.create_batch("\n".join(req(f"r{i}") for i in range(n)).encode(), **kw)


MIXED = [
    req("a"),                                         # 1 ok
    "{not json",                                      # 2 invalid_json
    req("b", max_tokens=4),                           # 3 ok
    json.dumps({"method": "POST", "url": CHAT, "body": {}}),  # 4 missing_field, custom_id None
    "",                                               # 5 blank: skipped
    req("a"),                                         # 6 duplicate_custom_id
    req("c", presence_penalty=0.5),                   # 7 unsupported_parameter
    req("d", COMP),                                   # 8 invalid_url (batch endpoint is chat)
    req("e"),                                         # 9 ok
]


def test_lifecycle_mixed_lines(store):
    b = store.create_batch(("\n".join(MIXED) + "\n").encode(), metadata={"job": "x"}, tenant="t1")
    assert b["status"] == "in_progress" and b["object"] == "batch" and b["endpoint"] == CHAT
    assert b["request_counts"] == {"total": 8, "completed": 0, "failed": 5}
    assert b["metadata"] == {"job": "x"} and b["tenant"] == "t1" and b["completion_window"] == "24h"
    assert b["expires_at"] == b["created_at"] + 86400 and b["in_progress_at"] is not None
    assert b["output_file"] is None and b["completed_at"] is None

    claimed = store.claim_lines(100)
    assert [(c.line_no, c.custom_id) for c in claimed] == [(1, "a"), (3, "b"), (9, "e")]
    assert claimed[1].parse().params.max_tokens == 4 and claimed[0].attempts == 1
    assert store.claim_lines(100) == []
    assert store.record_result(b["id"], 9, fake_output(claimed[2]), False)
    # the "engine" rejects line 3 (e.g. prompt too long): an error line from the daemon
    assert store.record_result(b["id"], 3, build_error_line("b", 3, "context_length_exceeded", "too long"),
                               True)
    partial = list(store.results(b["id"]))
    assert ids(partial) == ["e", None, "b", None, "a", "c", "d"]
    assert store.get_batch(b["id"])["status"] == "in_progress"
    assert store.record_result(b["id"], 1, fake_output(claimed[0]), False)

    done = store.get_batch(b["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 8, "completed": 2,
                                                                        "failed": 6}
    assert done["finalizing_at"] is not None and done["completed_at"] is not None
    out, err = read_jsonl(done["output_file"]), read_jsonl(done["error_file"])
    assert ids(out) == ["a", "e"]
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in err] == [
        (None, "invalid_json", 2), ("b", "context_length_exceeded", 3), (None, "missing_field", 4),
        ("a", "duplicate_custom_id", 6), ("c", "unsupported_parameter", 7), ("d", "invalid_url", 8)]
    assert list(store.results(b["id"])) == out + err
    assert Path(done["output_file"]) == store.state_dir / "batches" / b["id"] / "output.jsonl"


def test_record_result_is_idempotent_and_requeue(store):
    b = simple_batch(store, 3)
    c0, c1 = store.claim_lines(2)
    first = fake_output(c0)
    assert store.record_result(b["id"], c0.line_no, first, False)
    assert not store.record_result(b["id"], c0.line_no, fake_output(c0) | {"id": "other"}, False)
    assert not store.record_result(b["id"], c0.line_no, {"x": 1}, True)
    assert store.get_batch(b["id"])["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    with pytest.raises(Exception, match="custom_id"):
        store.record_result(b["id"], c1.line_no, {"custom_id": "wrong"}, False)

    assert store.requeue(b["id"], c1.line_no) and not store.requeue(b["id"], c1.line_no)
    again = store.claim_lines(10)
    assert [(c.line_no, c.attempts) for c in again] == [(c1.line_no, 2), (3, 1)]
    assert store.requeue_all_running() == 2
    for c in store.claim_lines(10):
        assert store.record_result(b["id"], c.line_no, fake_output(c), False)
    done = store.get_batch(b["id"])
    assert done["status"] == "completed" and done["error_file"] is None
    out = read_jsonl(done["output_file"])
    assert ids(out) == ["r0", "r1", "r2"] and out[0] == first


def test_cancel_midway(store):
    b = simple_batch(store, 10)
    running = store.claim_lines(3)
    assert store.record_result(b["id"], running[0].line_no, fake_output(running[0]), False)
    c = store.cancel_batch(b["id"])
    assert c["status"] == "cancelling" and c["cancelling_at"] is not None
    assert store.claim_lines(10) == [] and store.claim_lines(10, batch_id=b["id"]) == []
    assert not store.record_result(b["id"], 8, {"custom_id": "r7"}, False)  # pending: refused
    assert store.record_result(b["id"], running[1].line_no, fake_output(running[1]), False)
    assert store.get_batch(b["id"])["status"] == "cancelling"
    assert store.requeue(b["id"], running[2].line_no)  # the last running line: preempted
    done = store.get_batch(b["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    assert done["request_counts"] == {"total": 10, "completed": 2, "failed": 0}
    assert ids(read_jsonl(done["output_file"])) == ["r0", "r1"]
    assert store.cancel_batch(b["id"])["status"] == "cancelled"  # no-op
    assert store.claim_lines(10) == []


def test_expiry(store):
    b = simple_batch(store, 5, completion_window="1h")
    (c,) = store.claim_lines(1)
    assert store.check_expired(b["created_at"] + 3599) == []
    assert store.check_expired(b["created_at"] + 3600) == [b["id"]]
    assert store.get_batch(b["id"])["status"] == "finalizing" and store.claim_lines(5) == []
    assert store.record_result(b["id"], c.line_no, fake_output(c), False)
    done = store.get_batch(b["id"])
    assert done["status"] == "expired" and done["expired_at"] == b["created_at"] + 3600
    assert done["request_counts"] == {"total": 5, "completed": 1, "failed": 0}
    assert ids(read_jsonl(done["output_file"])) == ["r0"]


def test_failed_batches_and_bad_arguments(store):
    empty = store.create_batch(b"\n  \n")
    assert empty["status"] == "failed" and empty["errors"]["data"][0]["code"] == "empty_file"
    assert empty["request_counts"]["total"] == 0 and empty["failed_at"] is not None
    bad = store.create_batch(b"{x\n[1]\n")
    assert bad["status"] == "failed" and bad["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert [e["line"] for e in bad["errors"]["data"]] == [1, 2]
    assert [e["error"]["code"] for e in read_jsonl(bad["error_file"])] == ["invalid_json", "invalid_request"]
    with pytest.raises(Exception, match="completion_window"):
        simple_batch(store, 1, completion_window="soon")


def test_unknown_ids(store):
    for call in (lambda: store.get_batch("batch_nope"), lambda: store.cancel_batch("batch_nope"),
                 lambda: store.results("batch_nope"), lambda: store.list_batches(after="batch_nope"),
                 lambda: store.record_result("batch_nope", 1, {}, False),
                 lambda: store.claim_lines(1, batch_id="batch_nope")):
        with pytest.raises(BatchNotFound, match="batch_nope"):
            call()


def test_claim_order_list_and_persistence(tmp_path, store):
    path = tmp_path / "in.jsonl"
    path.write_text(req("x1") + "\n" + req("x2") + "\n", encoding="utf-8")
    slow = store.create_batch(path, tenant="a")
    urgent = simple_batch(store, 2, completion_window="1h", tenant="b")
    third = simple_batch(store, 1, tenant="a")
    # earliest deadline first; slow and third share a deadline bucket, so they take turns
    assert [(c.batch_id, c.line_no) for c in store.claim_lines(4)] == [
        (urgent["id"], 1), (urgent["id"], 2), (slow["id"], 1), (third["id"], 1)]
    assert [c.custom_id for c in store.claim_lines(5, batch_id=slow["id"])] == ["x2"]
    assert [x["id"] for x in store.list_batches()] == [third["id"], urgent["id"], slow["id"]]
    assert [x["id"] for x in store.list_batches(limit=1, after=third["id"])] == [urgent["id"]]
    assert [x["id"] for x in store.list_batches(tenant="a")] == [third["id"], slow["id"]]

    store.close()
    db = sqlite3.connect(tmp_path / "state" / "batches.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    db.execute("UPDATE batches SET status='validating' WHERE id=?", (third["id"],))  # killed mid-create
    db.commit()
    db.close()
    s2 = BatchStore(tmp_path / "state")
    s2.recover()
    assert s2.get_batch(third["id"])["status"] == "failed"
    assert s2.get_batch(slow["id"])["status"] == "in_progress"
    assert len(s2.claim_lines(10)) == 4  # requeued by recover()
    s2.close()


def test_state_dir_is_locked(tmp_path, store):
    with pytest.raises(Exception, match="in use by another hpcserve process"):
        BatchStore(store.state_dir)
    with pytest.raises(Exception, match="cannot read batch input"):
        store.create_batch(tmp_path / "missing.jsonl")
    store.close()
    BatchStore(store.state_dir).close()  # released on close (and by the kernel on any exit)


def test_no_torch_import():
    code = "import sys, hpcserve.daemon.batches; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent("""
    import random, sys, time
    from hpcserve.batch.openai_format import build_error_line
    from hpcserve.daemon.batches import TERMINAL, BatchStore
    state, inp, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    store = BatchStore(state)
    store.recover()
    if not store.list_batches(limit=1):
        store.create_batch(inp)
    bid = store.list_batches(limit=1)[0]["id"]
    print("READY", flush=True)
    while store.get_batch(bid)["status"] not in TERMINAL:
        claimed = store.claim_lines(rng.randint(1, 6))
        if not claimed:
            sys.exit("nothing to claim in a live batch")
        for c in claimed:
            time.sleep(0.01)
            if rng.random() < 0.05:
                store.requeue(bid, c.line_no)
                continue
            if c.line_no % 7 == 0:
                line, err = build_error_line(c.custom_id, c.line_no, "context_length_exceeded", "long"), True
            else:
                line, err = {"id": "r", "custom_id": c.custom_id, "response": {"status_code": 200},
                             "error": None}, False
            for _ in range(2 if rng.random() < 0.1 else 1):  # sometimes a duplicate report
                store.record_result(bid, c.line_no, line, err)
    print("DONE", flush=True)
""")


def _spawn(state, inp, seed, pause=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HPCSERVE_TEST_FINALIZE_PAUSE", None)
    if pause:
        env["HPCSERVE_TEST_FINALIZE_PAUSE"] = pause
    return subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(inp), str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _kill(p):
    p.kill()
    p.wait(10)
    assert p.returncode == -signal.SIGKILL
    p.stdout.close()
    p.stderr.close()


def _status(state):
    db = sqlite3.connect(Path(state) / "batches.sqlite")
    try:  # invariant at every kill point: the counts equal the stored results
        bid, status, counted = db.execute("SELECT id, status, completed + failed FROM batches").fetchone()
        assert counted == db.execute("SELECT COUNT(*) FROM lines WHERE state='done'").fetchone()[0]
        return bid, status, counted
    finally:
        db.close()


def test_sigkill_crash_safety(tmp_path):
    import time

    n = 200
    state, inp = tmp_path / "state", tmp_path / "in.jsonl"
    lines = [req(f"q{i:03d}") for i in range(n)]
    lines[50] = "{broken"  # custom_id None
    lines[120] = json.dumps({"custom_id": "q120", "method": "GET", "url": CHAT, "body": {}})
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = random.Random(1234)

    progress = []
    for k in range(5):  # killed at random moments while claiming/recording
        p = _spawn(state, inp, k)
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        time.sleep(rng.uniform(0.05, 0.35))
        _kill(p)
        progress.append(_status(state))
    assert progress[-1][1] == "in_progress", progress  # kills landed before the end
    assert progress[0][2] < progress[-1][2] < n

    # killed after the temp files are written, before the rename
    p = _spawn(state, inp, 10, pause="tmp:30")
    assert "finalize window tmp" in p.stderr.readline()
    _kill(p)
    assert _status(state)[1] == "finalizing"
    # killed after the rename, before the terminal status is committed (recover() re-finalizes)
    p = _spawn(state, inp, 11, pause="renamed:30")
    assert "finalize window renamed" in p.stderr.readline()
    _kill(p)
    bid, status, _ = _status(state)
    assert status == "finalizing"
    out_dir = state / "batches" / bid
    snapshot = {f: (out_dir / f).read_bytes() for f in ("output.jsonl", "errors.jsonl")}

    p = _spawn(state, inp, 12)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == ["READY", "DONE"], err

    store = BatchStore(state)
    store.recover()  # nothing left to do
    b = store.get_batch(bid)
    assert b["status"] == "completed"
    assert {f: (out_dir / f).read_bytes() for f in snapshot} == snapshot
    outs, errs = read_jsonl(b["output_file"]), read_jsonl(b["error_file"])
    assert b["request_counts"] == {"total": n, "completed": len(outs), "failed": len(errs)}
    got = ids(outs) + ids(errs)
    assert len(got) == n and sorted(got, key=str) == sorted([None, "q120"] + [
        f"q{i:03d}" for i in range(n) if i not in (50, 120)], key=str)
    want_err = {i + 1 for i in range(n) if (i + 1) % 7 == 0} | {51, 121}
    assert sorted(e["error"]["line"] for e in errs) == sorted(want_err)
    assert ids(outs) == sorted(ids(outs))  # line order
    assert list(store.results(bid)) == outs + errs
    store.close()


def test_usage_input_file_and_result_order(tmp_path, store):
    b = simple_batch(store, 4)
    assert b["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    assert Path(b["input_file"]).read_bytes() == "\n".join(req(f"r{i}") for i in range(4)).encode()
    c = store.claim_lines(4)

    def with_usage(cl, p, n):
        line = fake_output(cl)
        line["response"]["body"]["usage"] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        return line

    assert store.record_result(b["id"], 3, with_usage(c[2], 10, 5), False)
    assert not store.record_result(b["id"], 3, with_usage(c[2], 99, 99), False)  # repeat adds nothing
    bad_usage = with_usage(c[0], 7, 2) | {"response": {"body": {"usage": {"prompt_tokens": "x"}}}}
    assert store.record_result(b["id"], 1, bad_usage, False)  # malformed usage counts as none
    err = build_error_line("r1", 2, "context_length_exceeded", "long")
    err["response"] = {"body": {"usage": {"prompt_tokens": 50, "completion_tokens": 50}}}
    assert store.record_result(b["id"], 2, err, True)  # error lines add nothing
    got = store.get_batch(b["id"])
    assert got["usage"] == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    # stored order with a cursor; file order (outputs, then errors, by line) in result_rows
    rows = store.result_rows_after(b["id"])
    assert [(s, cid, e) for s, cid, _, e in rows] == [(1, "r2", False), (2, "r0", False), (3, "r1", True)]
    assert store.result_rows_after(b["id"], after_seq=2, limit=5)[0][1] == "r1"
    assert [(cid, e) for cid, _, e in store.result_rows(b["id"])] == [("r0", False), ("r2", False), ("r1", True)]
    assert store.record_result(b["id"], 4, with_usage(c[3], 1, 1), False)
    done = store.get_batch(b["id"])
    assert done["status"] == "completed" and done["usage"]["total_tokens"] == 17
    assert [json.loads(t) for _, t, e in store.result_rows(b["id"]) if not e] == read_jsonl(done["output_file"])
    path = tmp_path / "in.jsonl"
    path.write_text(req("p1") + "\n{bad\n", encoding="utf-8")
    b2 = store.create_batch(path)
    assert b2["input_file"] == str(path.absolute())
    assert [(s, e) for s, _, _, e in store.result_rows_after(b2["id"])] == [(1, True)]


def test_claims_are_fair_between_equal_deadlines(store):
    a = simple_batch(store, 6)
    b = simple_batch(store, 6)
    first = store.claim_lines(2, batch_id=a["id"])  # a is ahead by two lines
    assert len(first) == 2
    order = [c.batch_id for c in store.claim_lines(6)]
    assert order == [b["id"], b["id"], a["id"], b["id"], a["id"], b["id"]]
    for c in first:  # done lines count as served too
        assert store.record_result(c.batch_id, c.line_no, {"custom_id": c.custom_id, "response": None,
                                                           "error": None}, False)
    c = simple_batch(store, 3)
    assert [x.batch_id for x in store.claim_lines(2)] == [c["id"], c["id"]]


def test_tenant_scoping(store):
    a = simple_batch(store, 3, tenant="alice")
    b = simple_batch(store, 2, tenant="bob")
    (c,) = store.claim_lines(1, batch_id=a["id"])
    assert store.record_result(a["id"], c.line_no, fake_output(c), False)
    for call in (lambda: store.get_batch(a["id"], tenant="bob"), lambda: store.cancel_batch(a["id"], tenant="bob"),
                 lambda: store.results(a["id"], tenant="bob"), lambda: store.result_rows(a["id"], tenant="bob"),
                 lambda: store.result_rows_after(a["id"], tenant="bob"),
                 lambda: store.list_batches(after=a["id"], tenant="bob")):
        with pytest.raises(BatchNotFound) as exc:
            call()
        assert str(exc.value) == str(BatchNotFound(a["id"]))  # same as an unknown id
    assert store.get_batch(a["id"])["status"] == "in_progress"  # bob's cancel did nothing
    assert store.get_batch(a["id"], tenant="alice") == store.get_batch(a["id"])
    assert ids(store.results(a["id"], tenant="alice")) == ["r0"]
    assert [r[0] for r in store.result_rows(a["id"], tenant="alice")] == ["r0"]
    assert [r[1] for r in store.result_rows_after(a["id"], 0, 10, tenant="alice")] == ["r0"]
    assert [x["id"] for x in store.list_batches(tenant="bob")] == [b["id"]]
    assert store.cancel_batch(a["id"], tenant="alice")["status"] == "cancelled"


def test_claim_lines_exclude_tenants(store):
    a = simple_batch(store, 2, tenant="alice")
    b = simple_batch(store, 2, tenant="bob")
    c = simple_batch(store, 1, tenant="carol")
    got = store.claim_lines(10, exclude_tenants={"alice", "carol"})
    assert [(x.batch_id, x.tenant) for x in got] == [(b["id"], "bob")] * 2
    assert store.claim_lines(10, batch_id=a["id"], exclude_tenants=["alice"]) == []
    assert store.claim_lines(10, exclude_tenants=("alice", "bob", "carol")) == []
    # excluded lines stayed pending: claimable once the tenant is no longer excluded
    assert sorted((x.batch_id, x.line_no) for x in store.claim_lines(10, exclude_tenants=())) == sorted(
        [(a["id"], 1), (a["id"], 2), (c["id"], 1)])

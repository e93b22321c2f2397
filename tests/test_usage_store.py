"""hpcserve.daemon.usage_store through BatchStore: per-tenant daily usage counters in real
SQLite (accumulation, persistence, filters, all-or-nothing adds)."""

from __future__ import annotations

import calendar
import subprocess
import sys
from pathlib import Path

import pytest

from hpcserve.daemon.batches import BatchStore
from hpcserve.daemon.usage_store import utc_day
from hpcserve.errors import RequestError

ZERO = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "gpu_seconds": 0.0, "useful_seconds_interactive": 0.0,
        "useful_seconds_batch": 0.0}


@pytest.fixture
def store(tmp_path):
    s = BatchStore(tmp_path / "state")
    yield s
    s.close()


def test_utc_day():
    ts = calendar.timegm((2024, 2, 29, 23, 59, 59, 0, 0, 0))
    assert utc_day(ts) == "2024-02-29" and utc_day(ts + 1) == "2024-03-01"
    assert len(utc_day()) == 10 and utc_day().count("-") == 2


def test_add_usage_accumulates_and_survives_reopen(tmp_path, store):
    store.add_usage({("a", "2024-05-01"): {"requests": 1, "input_tokens": 10, "output_tokens": 5,
                                           "gpu_seconds": 0.25},
                     ("b", "2024-05-01"): {"input_tokens": 7}})
    store.add_usage({("a", "2024-05-01"): {"requests": 2, "output_tokens": 3, "gpu_seconds": 0.5},
                     ("a", "2024-05-02"): {"requests": 1, "input_tokens": 1}})
    store.add_usage({})
    want = [
        {"tenant": "a", "day": "2024-05-01", **ZERO, "requests": 3, "input_tokens": 10, "output_tokens": 8,
         "gpu_seconds": 0.75},
        {"tenant": "b", "day": "2024-05-01", **ZERO, "input_tokens": 7},
        {"tenant": "a", "day": "2024-05-02", **ZERO, "requests": 1, "input_tokens": 1},
    ]
    assert store.usage() == want
    store.close()
    s2 = BatchStore(tmp_path / "state")
    try:
        assert s2.usage() == want
        s2.add_usage({("b", "2024-05-01"): {"input_tokens": 1}})
        assert s2.tokens_on("2024-05-01") == {"a": 18, "b": 8}
    finally:
        s2.close()


def test_filters_and_totals(store):
    store.add_usage({("a", "2024-05-01"): {"requests": 1, "input_tokens": 100, "output_tokens": 10, "gpu_seconds": 1},
                     ("a", "2024-05-03"): {"requests": 2, "input_tokens": 200, "output_tokens": 20, "gpu_seconds": 2},
                     ("b", "2024-05-02"): {"requests": 4, "input_tokens": 400, "output_tokens": 40, "gpu_seconds": 4},
                     ("c", "2024-04-30"): {"requests": 8}})
    days = lambda rows: [(r["tenant"], r["day"]) for r in rows]
    assert days(store.usage()) == [("c", "2024-04-30"), ("a", "2024-05-01"), ("b", "2024-05-02"),
                                   ("a", "2024-05-03")]
    assert days(store.usage("a")) == [("a", "2024-05-01"), ("a", "2024-05-03")]
    assert days(store.usage(since_day="2024-05-02")) == [("b", "2024-05-02"), ("a", "2024-05-03")]
    assert days(store.usage(until_day="2024-05-01")) == [("c", "2024-04-30"), ("a", "2024-05-01")]
    assert days(store.usage("a", since_day="2024-05-02", until_day="2024-05-03")) == [("a", "2024-05-03")]
    assert store.usage("nobody") == []

    totals = store.usage_totals()
    assert totals == {
        "a": {"tenant": "a", **ZERO, "requests": 3, "input_tokens": 300, "output_tokens": 30, "gpu_seconds": 3.0},
        "b": {"tenant": "b", **ZERO, "requests": 4, "input_tokens": 400, "output_tokens": 40, "gpu_seconds": 4.0},
        "c": {"tenant": "c", **ZERO, "requests": 8},
    }
    assert store.usage_totals("a", since_day="2024-05-02") == {
        "a": {"tenant": "a", **ZERO, "requests": 2, "input_tokens": 200, "output_tokens": 20, "gpu_seconds": 2.0}}
    assert store.usage_totals(since_day="2024-06-01") == {}
    assert store.tokens_on("2024-05-03") == {"a": 220} and store.tokens_on("2024-05-04") == {}


def test_useful_seconds_per_class_add_up_and_debits_subtract(store):
    store.add_usage({("a", "2024-05-01"): {"useful_seconds_interactive": 1.5, "useful_seconds_batch": 4.0}})
    store.add_usage({("a", "2024-05-01"): {"useful_seconds_batch": 0.5},
                     ("a", "2024-05-02"): {"useful_seconds_batch": -2.0}})  # a debit the next day
    rows = {r["day"]: r for r in store.usage("a")}
    assert rows["2024-05-01"]["useful_seconds_interactive"] == 1.5 and rows["2024-05-01"]["useful_seconds_batch"] == 4.5
    assert rows["2024-05-02"]["useful_seconds_batch"] == -2.0
    assert store.usage_totals()["a"] == {"tenant": "a", **ZERO, "useful_seconds_interactive": 1.5,
                                         "useful_seconds_batch": 2.5}


# the usage table as the schema before useful seconds created it
OLD_USAGE_TABLE = """CREATE TABLE usage (
    tenant TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0, PRIMARY KEY (tenant, day))"""


def test_state_dir_of_the_old_usage_schema_is_migrated_in_place(tmp_path):
    import sqlite3

    state = tmp_path / "state"
    s = BatchStore(state)  # a state dir as the previous release left it: same store, old usage table
    s.close()
    db = sqlite3.connect(state / "batches.sqlite")
    with db:
        db.execute("DROP TABLE usage")
        db.execute(OLD_USAGE_TABLE)
        db.execute("INSERT INTO usage VALUES ('a', '2024-05-01', 2, 20, 10, 1.25)")
    db.close()
    s = BatchStore(state)
    try:
        cols = [r[1] for r in s._db.execute("PRAGMA table_info(usage)")]
        assert cols[-2:] == ["useful_seconds_interactive", "useful_seconds_batch"]
        assert s.usage() == [{"tenant": "a", "day": "2024-05-01", **ZERO, "requests": 2, "input_tokens": 20,
                              "output_tokens": 10, "gpu_seconds": 1.25}]
        s.add_usage({("a", "2024-05-01"): {"requests": 1, "useful_seconds_batch": 0.75}})
        row = s.usage()[0]
        assert (row["requests"], row["gpu_seconds"], row["useful_seconds_batch"]) == (3, 1.25, 0.75)
    finally:
        s.close()
    s = BatchStore(state)  # migrating again is a no-op
    try:
        assert s.usage()[0]["useful_seconds_batch"] == 0.75
    finally:
        s.close()


def test_bad_input_changes_nothing(store):
    store.add_usage({("a", "2024-05-01"): {"requests": 1}})
    before = store.usage()
    for bad in ({("a", "2024-05-01"): {"requests": 1}, ("a", "May 2"): {"requests": 1}},
                {("a", "2024-05-01"): {"requests": 1}, ("b", "2024-05-01"): {"tokens": 1}},
                {("a", "2024-05-01"): {"requests": 1}, "a": {"requests": 1}}):
        with pytest.raises(ValueError):
            store.add_usage(bad)
    assert store.usage() == before  # all or nothing
    for call in (lambda: store.usage(since_day="yesterday"), lambda: store.usage(until_day="2024/05/01"),
                 lambda: store.usage_totals(since_day="1"), lambda: store.tokens_on("")):
        with pytest.raises(RequestError, match="YYYY-MM-DD"):
            call()


def test_no_torch_import():
    code = "import sys, hpcserve.daemon.usage_store, hpcserve.daemon.files; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)

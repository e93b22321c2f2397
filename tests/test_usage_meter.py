"""UsageMeter (hpcserve/daemon/usage.py): GPU-second attribution by token share, per-tenant
request/token counts, the UTC day rollover (injected wall clock), take/restore of store deltas,
the flusher against a store object whose first write fails, and useful seconds per tenant and
class (credits x ranks, debits of a whole account or one replica's part). No torch, no gRPC."""

from __future__ import annotations

import asyncio
import calendar
import time

import pytest

from hpcserve.daemon.usage import UNATTRIBUTED, Account, UsageMeter, flush, run_flusher, utc_day

DAY1_NOON = calendar.timegm((2030, 3, 14, 12, 0, 0))
DAY1_LAST_SECOND = calendar.timegm((2030, 3, 14, 23, 59, 59))
DAY2_START = DAY1_LAST_SECOND + 1


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


NO_USEFUL = {"useful_seconds_interactive": 0.0, "useful_seconds_batch": 0.0}


def _step(m: UsageMeter, shares, tenants, step_time_s: float, num_ranks: int = 1) -> None:
    """A step whose shares carry no useful-work credit (the GPU-second split only); ``tenants``:
    request id -> tenant, a dict or a callable."""
    lookup = tenants.get if isinstance(tenants, dict) else tenants
    accounts: dict[str, Account] = {}

    def account_of(rid: str) -> Account | None:
        t = lookup(rid)
        return None if t is None else accounts.setdefault(rid, Account(t))

    m.on_step([(rid, n, 0.0) for rid, n in shares], account_of, step_time_s, num_ranks=num_ranks)


def _gpu(meter: UsageMeter) -> dict[str, float]:
    return {t: row["gpu_seconds"] for t, row in meter.snapshot().items() if row["gpu_seconds"]}


def test_utc_day_is_the_utc_calendar_day():
    assert utc_day(DAY1_LAST_SECOND) == "2030-03-14"
    assert utc_day(DAY2_START) == "2030-03-15"
    assert utc_day() == time.strftime("%Y-%m-%d", time.gmtime())


def test_step_time_is_split_by_token_share_and_conserved():
    m = UsageMeter(wall=Clock(DAY1_NOON))
    tenants = {"r1": "alice", "r2": "alice", "r3": "bob"}
    _step(m, [("r1", 30), ("r2", 10), ("r3", 40)], tenants, step_time_s=0.8, num_ranks=2)
    gpu = _gpu(m)
    assert gpu["alice"] == pytest.approx(1.6 * 40 / 80)
    assert gpu["bob"] == pytest.approx(1.6 * 40 / 80)
    # a callable lookup, a decode-only step on one rank
    _step(m, [("r1", 1), ("r3", 1), ("r3b", 1)], lambda rid: tenants.get(rid[:2]), step_time_s=0.3)
    gpu = _gpu(m)
    assert gpu["alice"] == pytest.approx(0.8 + 0.1)
    assert gpu["bob"] == pytest.approx(0.8 + 0.2)
    assert sum(gpu.values()) == pytest.approx(0.8 * 2 + 0.3)


def test_unknown_requests_and_empty_steps_go_to_unattributed():
    m = UsageMeter(wall=Clock(DAY1_NOON))
    _step(m, [("known", 3), ("gone", 1)], {"known": "alice"}, step_time_s=1.0, num_ranks=4)
    _step(m, [], {}, step_time_s=0.5)  # a step that computed no token (only aborts)
    _step(m, [("known", 3)], {"known": "alice"}, step_time_s=0.0)  # no step ran: nothing
    gpu = _gpu(m)
    assert gpu == {"alice": pytest.approx(3.0), UNATTRIBUTED: pytest.approx(1.0 + 0.5)}
    assert sum(gpu.values()) == pytest.approx(4.0 + 0.5)


def test_finished_requests_count_tokens_and_tokens_today_starts_from_the_store():
    m = UsageMeter(initial_tokens_today={"alice": 1000, "carol": 7}, wall=Clock(DAY1_NOON))
    m.on_finished("alice", 12, 30)
    m.on_finished("alice", 5, 0)
    m.on_finished("bob", 8, 2)
    assert m.tokens_today("alice") == 1000 + 47
    assert m.tokens_today("bob") == 10
    assert m.tokens_today("carol") == 7
    assert m.tokens_today("nobody") == 0
    snap = m.snapshot()
    assert snap["alice"] == {"requests": 2, "input_tokens": 17, "output_tokens": 30, "gpu_seconds": 0.0,
                             **NO_USEFUL, "tokens_today": 1047}
    assert snap["carol"]["requests"] == 0 and snap["carol"]["tokens_today"] == 7


def test_utc_midnight_resets_tokens_today_and_splits_deltas_by_day():
    clock = Clock(DAY1_LAST_SECOND)
    m = UsageMeter(initial_tokens_today={"alice": 500}, wall=clock)
    m.on_finished("alice", 10, 5)
    _step(m, [("r", 1)], {"r": "alice"}, 0.25)
    assert m.tokens_today("alice") == 515
    clock.t = DAY2_START
    assert m.tokens_today("alice") == 0  # a new UTC day
    m.on_finished("alice", 1, 2)
    _step(m, [("r", 1)], {"r": "alice"}, 0.5)
    assert m.tokens_today("alice") == 3
    deltas = m.take_deltas()
    assert deltas == {
        ("alice", "2030-03-14"): {"requests": 1, "input_tokens": 10, "output_tokens": 5, "gpu_seconds": 0.25,
                                  **NO_USEFUL},
        ("alice", "2030-03-15"): {"requests": 1, "input_tokens": 1, "output_tokens": 2, "gpu_seconds": 0.5,
                                  **NO_USEFUL},
    }
    snap = m.snapshot()["alice"]  # since daemon start: both days
    assert (snap["requests"], snap["input_tokens"], snap["output_tokens"]) == (2, 11, 7)
    assert snap["gpu_seconds"] == pytest.approx(0.75) and snap["tokens_today"] == 3


def test_take_clears_and_restore_merges_with_newer_usage():
    m = UsageMeter(wall=Clock(DAY1_NOON))
    m.on_finished("alice", 4, 6)
    first = m.take_deltas()
    assert first == {("alice", "2030-03-14"): {"requests": 1, "input_tokens": 4, "output_tokens": 6,
                                               "gpu_seconds": 0.0, **NO_USEFUL}}
    assert m.take_deltas() == {}
    m.on_finished("alice", 1, 1)
    _step(m, [("r", 2)], {"r": "bob"}, 0.5)
    m.restore(first)  # the write of `first` failed
    again = m.take_deltas()
    assert again[("alice", "2030-03-14")] == {"requests": 2, "input_tokens": 5, "output_tokens": 7,
                                              "gpu_seconds": 0.0, **NO_USEFUL}
    assert again[("bob", "2030-03-14")]["gpu_seconds"] == pytest.approx(0.5)
    assert m.tokens_today("alice") == 12  # restore does not count the tokens again


class FlakyStore:
    """Stands in for the usage store's ``add_usage`` (one transaction per call); the first
    ``failures`` writes fail, as a locked or full database would."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.rows: dict[tuple[str, str], dict[str, float]] = {}

    def add_usage(self, deltas) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError("database is locked")
        for key, amounts in deltas.items():
            row = self.rows.setdefault(key, {})
            for k, v in amounts.items():
                row[k] = row.get(k, 0) + v


def test_flush_puts_back_what_a_failed_write_did_not_take():
    async def main():
        m = UsageMeter(wall=Clock(DAY1_NOON))
        store = FlakyStore(failures=1)
        m.on_finished("alice", 3, 4)
        assert await flush(m, store) is False
        m.on_finished("alice", 1, 1)
        assert await flush(m, store) is True
        assert await flush(m, store) is True  # nothing left: no write
        return store

    store = asyncio.run(main())
    assert store.calls == 2
    assert store.rows == {("alice", "2030-03-14"): {"requests": 2, "input_tokens": 4, "output_tokens": 5,
                                                    "gpu_seconds": 0.0, **NO_USEFUL}}


def test_flusher_loses_nothing_across_failures_and_cancellation():
    async def main():
        m = UsageMeter(wall=Clock(DAY1_NOON))
        store = FlakyStore(failures=2)
        task = asyncio.create_task(run_flusher(m, store, interval_s=0.01))
        for i in range(5):
            m.on_finished("alice", 10, i)
            _step(m, [("r", 1), ("s", 1)], {"r": "alice", "s": "bob"}, 0.2, num_ranks=2)
            await asyncio.sleep(0.02)
        while store.calls < 3:  # two failed writes and at least one that went through
            await asyncio.sleep(0.01)
        m.on_finished("bob", 2, 2)  # recorded after the last periodic write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await flush(m, store) is True  # the shutdown flush
        return store

    store = asyncio.run(main())
    alice = store.rows[("alice", "2030-03-14")]
    bob = store.rows[("bob", "2030-03-14")]
    assert (alice["requests"], alice["input_tokens"], alice["output_tokens"]) == (5, 50, 0 + 1 + 2 + 3 + 4)
    assert (bob["requests"], bob["input_tokens"], bob["output_tokens"]) == (1, 2, 2)
    assert alice["gpu_seconds"] == pytest.approx(5 * 0.2) and bob["gpu_seconds"] == pytest.approx(5 * 0.2)


def test_flush_to_the_real_store_and_restart_from_its_tokens_of_today(tmp_path):
    from hpcserve.daemon.batches import BatchStore

    clock = Clock(DAY1_LAST_SECOND)
    m = UsageMeter(wall=clock)
    m.on_finished("alice", 100, 20)
    _step(m, [("r", 3), ("s", 1)], {"r": "alice", "s": "bob"}, 0.4, num_ranks=2)

    async def main(store):
        assert await flush(m, store) is True
        clock.t = DAY2_START
        m.on_finished("alice", 1, 1)
        assert await flush(m, store) is True

    store = BatchStore(tmp_path / "state")
    asyncio.run(main(store))
    totals = store.usage_totals()
    snap = m.snapshot()
    for tenant in ("alice", "bob"):
        got = {k: totals[tenant][k] for k in ("requests", "input_tokens", "output_tokens")}
        assert got == {k: snap[tenant][k] for k in got}
        assert totals[tenant]["gpu_seconds"] == pytest.approx(snap[tenant]["gpu_seconds"])
    assert store.tokens_on("2030-03-14") == {"alice": 120, "bob": 0}
    # a daemon restarted on day 2 continues the day's count from the store
    again = UsageMeter(initial_tokens_today=store.tokens_on(utc_day(DAY2_START)), wall=Clock(DAY2_START + 60))
    assert again.tokens_today("alice") == 2 == m.tokens_today("alice")
    store.close()


# ---------------------------------------------------------------------------- useful seconds
def _useful(meter: UsageMeter) -> dict[tuple[str, str], float]:
    return {(t, k[len("useful_seconds_"):]): row[k] for t, row in meter.snapshot().items()
            for k in ("useful_seconds_interactive", "useful_seconds_batch") if row[k]}


def test_useful_seconds_go_to_tenant_class_and_account_times_ranks():
    m = UsageMeter(wall=Clock(DAY1_NOON))
    chat, line, other = Account("alice"), Account("alice", "batch"), Account("bob", "batch")
    accounts = {"chat": chat, "line": line, "other": other}
    m.on_step([("chat", 1, 0.01), ("line", 64, 0.2), ("gone", 8, 0.05)], accounts, 0.3, num_ranks=2, replica_id=3)
    m.on_step([("chat", 1, 0.02), ("other", 1, 0.03)], accounts, 0.06, replica_id=4)
    assert _useful(m) == pytest.approx({("alice", "interactive"): 2 * 0.01 + 0.02, ("alice", "batch"): 2 * 0.2,
                                        ("bob", "batch"): 0.03})  # "gone" is unknown: earns nothing
    assert chat.useful_s == pytest.approx({3: 0.02, 4: 0.02}) and line.useful_s == pytest.approx({3: 0.4})
    totals = m.totals()
    assert totals["gpu_seconds"] == pytest.approx(0.6 + 0.06)
    assert totals["useful_seconds_batch"] == pytest.approx(0.43)
    assert totals["useful_seconds_interactive"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="request_class"):
        Account("alice", "urgent")


def test_debit_takes_back_all_or_one_replicas_part_once():
    m = UsageMeter(wall=Clock(DAY1_NOON))
    a, b = Account("carol", "batch"), Account("carol", "batch")
    m.on_step([("a", 100, 0.5), ("b", 100, 0.25)], {"a": a, "b": b}, 1.0, replica_id=0)  # prefill replica 0
    m.on_step([("a", 1, 0.125), ("b", 1, 0.0625)], {"a": a, "b": b}, 0.25, replica_id=1)  # decode replica 1
    assert m.debit(a, replica_id=0) == pytest.approx(0.5)  # a's handoff failed: replica 1 recomputes
    assert a.useful_s == pytest.approx({1: 0.125})
    assert m.debit(b) == pytest.approx(0.3125)  # b's line was requeued
    assert m.debit(b) == 0.0 and b.useful_s == {}
    assert _useful(m) == pytest.approx({("carol", "batch"): 0.125})
    assert m.take_deltas()[("carol", "2030-03-14")]["useful_seconds_batch"] == pytest.approx(0.125)


def test_a_debit_after_midnight_lands_on_the_new_day():
    clock = Clock(DAY1_LAST_SECOND)
    m = UsageMeter(wall=clock)
    acct = Account("dave", "batch")
    m.on_step([("x", 10, 0.4)], {"x": acct}, 0.5)
    clock.t = DAY2_START
    m.debit(acct)
    deltas = m.take_deltas()
    assert deltas[("dave", "2030-03-14")]["useful_seconds_batch"] == pytest.approx(0.4)
    assert deltas[("dave", "2030-03-15")]["useful_seconds_batch"] == pytest.approx(-0.4)
    assert m.snapshot()["dave"]["useful_seconds_batch"] == pytest.approx(0.0)

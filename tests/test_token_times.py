"""TokenTimes (the server's own TTFT/ITL per request) and LoopLag (event-loop lateness): pure units."""

from __future__ import annotations

import asyncio
import time

import pytest

from hpcserve.daemon.loop_lag import LoopLag
from hpcserve.daemon.token_times import TokenTimes


def test_token_times_from_engine_timestamps():
    t = TokenTimes(arrival_time=100.0)
    assert t.as_dict()["ttft_s"] == 0 and t.itl_mean_s == 0
    t.add(0.0, 1)  # no step time (an output without tokens' timestamp): ignored
    t.add(100.5, 0)  # no tokens: ignored
    t.add(100.5, 1)
    t.add(100.6, 1)
    t.add(101.0, 2)  # two tokens in one step: gaps 0.4 then 0
    d = t.as_dict()
    assert d["first_token_time"] == 100.5 and d["last_token_time"] == 101.0
    assert d["ttft_s"] == pytest.approx(0.5)
    assert d["itl_max_s"] == pytest.approx(0.4)
    assert d["itl_mean_s"] == pytest.approx((0.1 + 0.4 + 0.0) / 3)


def test_loop_lag_sees_a_blocked_loop_and_forgets_it():
    lag = LoopLag(interval_s=0.01, window_s=0.5)

    async def main():
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.05)
        quiet = lag.max_s()
        time.sleep(0.3)  # hold the loop, as a tokenizer on it would
        await asyncio.sleep(0.05)
        blocked = lag.max_s()
        await asyncio.sleep(0.7)  # past the window
        later = lag.max_s()
        task.cancel()
        return quiet, blocked, later

    quiet, blocked, later = asyncio.run(main())
    assert blocked >= 0.29 > quiet
    assert later < blocked

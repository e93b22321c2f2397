"""How late the daemon's event loop runs: the health of everything that shares it (every stream's
chunks, admission, the router). No torch, no grpc.

Interface::

    lag = LoopLag(interval_s=0.05, window_s=60.0)
    task = asyncio.create_task(lag.run())    # until cancelled
    lag.max_s() -> float                     # worst lateness over the last window_s seconds

``run`` sleeps ``interval_s`` at a time and records by how much each wake-up came late: anything
that holds the loop (a tokenizer on a large prompt, a big JSON body, a slow store call on the loop)
shows up here. Work that belongs off the loop must not move this number.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLag:
    def __init__(self, interval_s: float = 0.05, window_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (when, lateness), worst kept per tick

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self._record(now, max(0.0, now - t0 - self.interval_s))

    def _record(self, now: float, late: float) -> None:
        samples = self._samples
        while samples and samples[0][0] < now - self.window_s:
            samples.popleft()
        while samples and samples[-1][1] <= late:  # keep a decreasing run: max() is samples[0]
            samples.pop()
        samples.append((now, late))

    def max_s(self) -> float:
        now = time.monotonic()
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        return self._samples[0][1] if self._samples else 0.0

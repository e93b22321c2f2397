"""Per-tenant rate limits, concurrency caps and daily token quotas. No grpc, no torch.

Interface::

    Limiter(policies, tokens_today, clock=time.monotonic, wall=time.time)
        .precheck(tenant)                       # the same refusal for any request, before any work
        .admit(tenant, est_tokens) -> Lease     # AuthError("resource_exhausted", retry_after_s=...) when over
        .exhausted_tenants() -> set[str]        # daily quota used up today
        .snapshot() -> {tenant: {active_streams, requests_last_minute, tokens_last_minute,
                                 tokens_today, daily_token_quota}}
    Lease.finish(actual_tokens=None)            # idempotent; also a context manager

Lifecycle: the daemon builds one ``Limiter`` from ``SiteConfig.tenants`` and the usage meter's
``tokens_today(tenant)`` (finished chat and batch tokens, in + out, this UTC day). Every chat
request calls ``admit`` with its estimate (prompt tokens + max_tokens) before it is scheduled and
``finish`` on the returned lease when it ends (however it ends), passing the tokens it really used
when known. The router asks ``exhausted_tenants()`` before it feeds a tenant's batch lines.

Rules, in this order; a rejected request is charged nothing:

1. ``max-concurrent-streams``: leases not yet finished >= the cap → retry after 1 s.
2. ``requests-per-minute`` / ``tokens-per-minute``: sliding 60-second windows over the admitted
   requests (monotonic ``clock``): a request fits when the window's count + 1, resp. its tokens +
   ``est_tokens``, stay within the limit. Retry-after is the time until enough of the window's
   oldest entries age out (rounded up, >= 1 s). A sliding window, not a token bucket, so the limit
   reads exactly as written: at most N in any 60 s. ``finish(actual_tokens)`` corrects the
   request's entry from the estimate to the actual count (if it is still in the window). A request
   whose estimate alone exceeds tokens-per-minute can never fit: refused without a retry hint.
3. ``daily-token-quota``: ``tokens_today(tenant)`` >= quota → retry after the next 00:00 UTC
   (``wall`` clock).

A limit of 0 is unlimited. Thread-safe; ``tokens_today`` is called outside the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hpcserve.config_tables import TenantSection
from hpcserve.daemon.tenants import AuthError

WINDOW_S = 60.0
DAY_S = 86400


def _dur(seconds: float) -> str:
    s = max(math.ceil(seconds), 0)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class _Usage:
    active: int = 0
    requests: deque[float] = field(default_factory=deque)  # admit times
    tokens: deque[list] = field(default_factory=deque)  # [admit time, tokens] (mutable: finish corrects it)

    def prune(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.tokens.popleft()

    def window_tokens(self) -> int:
        return sum(n for _, n in self.tokens)


class Lease:
    """One admitted request: holds a concurrency slot and its tokens-per-minute entry until ``finish``."""

    def __init__(self, limiter: Limiter, tenant: str, entry: list):
        self._limiter = limiter
        self.tenant = tenant
        self._entry = entry
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def finish(self, actual_tokens: int | None = None) -> None:
        """Free the concurrency slot (once; later calls do nothing). With ``actual_tokens``, the
        request's tokens-per-minute entry becomes the actual count instead of the estimate."""
        self._limiter._finish(self, actual_tokens)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class Limiter:
    """Admission control per tenant (see the module docstring)."""

    def __init__(self, policies: Mapping[str, TenantSection], tokens_today: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._policies = dict(policies)
        self._tokens_today = tokens_today
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {name: _Usage() for name in self._policies}

    def _policy(self, tenant: str) -> TenantSection:
        policy = self._policies.get(tenant)
        if policy is None:
            raise AuthError(f"tenant {tenant!r} is not defined in the site config (defined: "
                            f"{', '.join(self._policies) or 'none'})", "unauthenticated")
        return policy

    def admit(self, tenant: str, est_tokens: int) -> Lease:
        """Charge one request of ``est_tokens`` tokens to ``tenant`` and return its lease, or raise
        AuthError("resource_exhausted") naming the limit, charging nothing."""
        return self._check(tenant, max(int(est_tokens), 0))

    def precheck(self, tenant: str) -> None:
        """Raise the AuthError ``admit`` would raise for any request of ``tenant`` right now (streams,
        requests per minute, a tokens-per-minute window already full, daily quota), charging nothing.
        Admission calls it before tokenizing, so an over-limit tenant costs the daemon no work;
        ``admit`` still decides (with the request's tokens)."""
        self._check(tenant, None)

    def _check(self, tenant: str, est: int | None) -> Lease | None:
        """The rules in order; with ``est`` (a request's tokens) the request is charged and its lease
        returned, without (a precheck) nothing is charged."""
        p = self._policy(tenant)
        used_today = self._tokens_today(tenant) if p.daily_token_quota else 0
        with self._lock:
            now = self._clock()
            u = self._usage[tenant]
            u.prune(now)
            self._check_concurrency(tenant, p, u)
            self._check_rpm(tenant, p, u, now)
            if est is not None:
                self._check_tpm(tenant, p, u, now, est)
            elif p.tokens_per_minute and u.window_tokens() >= p.tokens_per_minute:
                self._check_tpm(tenant, p, u, now, 1)  # the window is full: no request fits
            if p.daily_token_quota and used_today >= p.daily_token_quota:
                raise self._quota_error(tenant, p, used_today)
            if est is None:
                return None
            u.active += 1
            u.requests.append(now)
            entry = [now, est]
            u.tokens.append(entry)
        return Lease(self, tenant, entry)

    def _finish(self, lease: Lease, actual_tokens: int | None) -> None:
        with self._lock:
            if lease._done:
                return
            lease._done = True
            self._usage[lease.tenant].active -= 1
            if actual_tokens is not None:
                lease._entry[1] = max(int(actual_tokens), 0)  # no effect once the entry left the window

    # --------------------------------------------------------------------------- the rules
    @staticmethod
    def _check_concurrency(tenant: str, p: TenantSection, u: _Usage) -> None:
        cap = p.max_concurrent_streams
        if cap and u.active >= cap:
            raise AuthError(f"tenant {tenant} has {u.active} requests in flight, its limit "
                            f"(tenants.{tenant}.max-concurrent-streams = {cap}); wait for one to finish, or ask "
                            "the site admin to raise the limit", "resource_exhausted", retry_after_s=1.0)

    @staticmethod
    def _check_rpm(tenant: str, p: TenantSection, u: _Usage, now: float) -> None:
        limit = p.requests_per_minute
        if limit and len(u.requests) >= limit:
            # the oldest entries must age out until one slot is free
            free_at = u.requests[len(u.requests) - limit] + WINDOW_S
            retry = max(1.0, float(math.ceil(free_at - now)))
            raise AuthError(f"tenant {tenant} made {len(u.requests)} requests in the last minute, its limit "
                            f"(tenants.{tenant}.requests-per-minute = {limit}); retry in {_dur(retry)}, or ask the "
                            "site admin to raise the limit", "resource_exhausted", retry_after_s=retry)

    @staticmethod
    def _check_tpm(tenant: str, p: TenantSection, u: _Usage, now: float, est: int) -> None:
        limit = p.tokens_per_minute
        if not limit:
            return
        if est > limit:
            raise AuthError(f"this request alone needs {est} tokens (prompt + max_tokens), more than tenant "
                            f"{tenant}'s limit (tenants.{tenant}.tokens-per-minute = {limit}); lower max_tokens or "
                            "shorten the prompt", "resource_exhausted", retry_after_s=None)
        used = u.window_tokens()
        if used + est <= limit:
            return
        for t, n in u.tokens:  # oldest first: when has enough aged out?
            used -= n
            if used + est <= limit:
                retry = max(1.0, float(math.ceil(t + WINDOW_S - now)))
                break
        else:  # unreachable: est <= limit, so an empty window fits
            retry = WINDOW_S
        raise AuthError(f"tenant {tenant} used {u.window_tokens()} tokens in the last minute and this request needs "
                        f"{est} more, over its limit (tenants.{tenant}.tokens-per-minute = {limit}); retry in "
                        f"{_dur(retry)}, lower max_tokens, or ask the site admin to raise the limit",
                        "resource_exhausted", retry_after_s=retry)

    def _quota_error(self, tenant: str, p: TenantSection, used: int) -> AuthError:
        now = self._wall()
        midnight = (math.floor(now / DAY_S) + 1) * DAY_S
        retry = max(1.0, float(math.ceil(midnight - now)))
        return AuthError(f"tenant {tenant} used its daily token quota ({used} of "
                         f"tenants.{tenant}.daily-token-quota = {p.daily_token_quota} tokens today); it resets at "
                         f"00:00 UTC, in {_dur(retry)}; ask the site admin to raise it if you need more today",
                         "resource_exhausted", retry_after_s=retry)

    # ---------------------------------------------------------------------------- reporting
    def exhausted_tenants(self) -> set[str]:
        """Tenants whose daily token quota is used up today (the router holds their batch lines)."""
        return {name for name, p in self._policies.items()
                if p.daily_token_quota and self._tokens_today(name) >= p.daily_token_quota}

    def snapshot(self) -> dict[str, dict]:
        today = {name: self._tokens_today(name) for name in self._policies}
        out = {}
        with self._lock:
            now = self._clock()
            for name, p in self._policies.items():
                u = self._usage[name]
                u.prune(now)
                out[name] = {"active_streams": u.active, "requests_last_minute": len(u.requests),
                             "tokens_last_minute": u.window_tokens(), "tokens_today": today[name],
                             "daily_token_quota": p.daily_token_quota}
        return out

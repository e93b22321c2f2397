"""Who is calling and what they may do: API key → tenant → policy. No grpc, no torch.

Interface::

    AuthError(message, code, retry_after_s=None)   # code: unauthenticated | permission_denied | resource_exhausted
    Principal(tenant, key_id, policy)              # .is_admin
    Tenants(policies, keys_path, reload_interval_s=1.0)
        .mint_key(tenant) -> str                   # in-memory key (key_id "endpoint") for endpoint.json
        .authenticate(key) -> Principal            # AuthError("unauthenticated")
        .check_model(principal, model)             # AuthError("permission_denied")
        .require_admin(principal, what)            # AuthError("permission_denied")
        .priority_class(principal, requested) -> "interactive" | "batch"
        .cache_salt(tenant) -> str                 # prefix-cache namespace ("" = shared)
        .policy(tenant) -> TenantSection | None
        .names -> list[str]

Lifecycle: the daemon builds one ``Tenants`` at start from ``SiteConfig.tenants`` and
``SiteConfig.keys_path`` (a malformed keys file then raises ``HpcserveError``), mints the
``auth.endpoint-tenant`` key for endpoint.json, and calls ``authenticate`` on every request (the
auth interceptor and the HTTP gateway). ``authenticate`` re-reads the keys file when its
``(mtime_ns, size, inode)`` changed, checking at most once per ``reload_interval_s``, so
``hpcserve keys add/revoke`` take effect on a running daemon within about a second. A keys file
that turns malformed while running is logged once and ignored: the last good set stays in force.
Thread-safe (one lock around the reload).

Messages never echo a key. ``AuthError.code`` maps onto gRPC status codes / HTTP 401, 403, 429.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hpcserve.config_tables import PRIORITIES, TenantSection
from hpcserve.daemon.keys import KeyRecord, KeysFile, hash_key, lookup
from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.daemon")

AUTH_CODES = ("unauthenticated", "permission_denied", "resource_exhausted")
ENDPOINT_KEY_ID = "endpoint"
_HOW_TO_GET_A_KEY = ("local clients read the key from the daemon's endpoint.json (--state-dir); other users get "
                     "one from the site admin (`hpcserve keys add --tenant NAME`)")


class AuthError(HpcserveError):
    """A request is refused: ``code`` is ``"unauthenticated"`` (no/bad key), ``"permission_denied"``
    (the key's tenant may not do this) or ``"resource_exhausted"`` (over a limit; ``retry_after_s``
    is the hint for a Retry-After header, None when retrying cannot help)."""

    def __init__(self, message: str, code: str, retry_after_s: float | None = None):
        if code not in AUTH_CODES:
            raise ValueError(f"AuthError code must be one of {', '.join(AUTH_CODES)}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the tenant, the key it used (``"endpoint"`` for the minted key)
    and the tenant's policy from the site config."""

    tenant: str
    key_id: str
    policy: TenantSection

    @property
    def is_admin(self) -> bool:
        return self.policy.admin


_Signature = tuple[int, int, int]  # (mtime_ns, size, inode) of the keys file


class Tenants:
    """The tenants of the site config and their API keys (see the module docstring)."""

    def __init__(self, policies: Mapping[str, TenantSection], keys_path: Path | None,
                 reload_interval_s: float = 1.0):
        self._policies = dict(policies)
        self._file = KeysFile(keys_path) if keys_path is not None else None
        self._interval = float(reload_interval_s)
        self._lock = threading.Lock()
        self._minted: tuple[str, str] | None = None  # (digest, tenant)
        self._records: list[KeyRecord] = []
        self._sig: _Signature | None = None
        self._checked = time.monotonic()
        self._warned_sig: _Signature | None = None
        if self._file is not None:
            self._sig = self._signature()
            self._records = self._file.records()  # malformed at start: raise

    # ---------------------------------------------------------------------------- properties
    @property
    def names(self) -> list[str]:
        return list(self._policies)

    def policy(self, tenant: str) -> TenantSection | None:
        return self._policies.get(tenant)

    # ------------------------------------------------------------------------------- keys
    def mint_key(self, tenant: str, key: str | None = None) -> str:
        """A fresh key for ``tenant`` that lives only in this process (key id ``"endpoint"``); it
        replaces the key minted before. The daemon writes it into endpoint.json. ``key``: use this
        key instead of a random one (embedding code and tests that need a known key)."""
        if tenant not in self._policies:
            raise HpcserveError(f"cannot mint a key for tenant {tenant!r}: the site config does not define it "
                                f"(defined: {', '.join(self._policies) or 'none'}); add [tenants.{tenant}]")
        from hpcserve.daemon.keys import new_key

        key = key or new_key()
        with self._lock:
            self._minted = (hash_key(key), tenant)
        return key

    def authenticate(self, key: str | None) -> Principal:
        """The caller behind ``key``; AuthError("unauthenticated") for a missing, unknown or revoked key,
        or one whose tenant the site config no longer defines."""
        key = (key or "").strip()
        if not key:
            raise AuthError(f"no API key given; send one as 'authorization: Bearer KEY': {_HOW_TO_GET_A_KEY}",
                            "unauthenticated")
        self._maybe_reload()
        with self._lock:
            minted, records = self._minted, self._records
        if minted is not None and hmac.compare_digest(minted[0], hash_key(key)):
            return self._principal(minted[1], ENDPOINT_KEY_ID)
        rec = lookup(records, key)
        if rec is None:
            raise AuthError(f"unknown API key (not in the daemon's keys file, nor the key of its current "
                            f"endpoint.json; a key minted by an earlier daemon start is void): {_HOW_TO_GET_A_KEY}",
                            "unauthenticated")
        if not rec.is_active:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rec.revoked_at))
            raise AuthError(f"API key {rec.key_id} (tenant {rec.tenant}) was revoked at {when}; ask the site "
                            f"admin for a new one (`hpcserve keys add --tenant {rec.tenant}`)", "unauthenticated")
        return self._principal(rec.tenant, rec.key_id)

    def _principal(self, tenant: str, key_id: str) -> Principal:
        policy = self._policies.get(tenant)
        if policy is None:
            raise AuthError(f"API key {key_id} belongs to tenant {tenant!r}, which the daemon's site config does "
                            f"not define (defined: {', '.join(self._policies) or 'none'}); the site admin must "
                            f"add [tenants.{tenant}] and restart the daemon, or issue a key of a defined tenant",
                            "unauthenticated")
        return Principal(tenant, key_id, policy)

    @property
    def keys_file(self) -> KeysFile | None:
        """The keys file this daemon reads (None: keys only from ``mint_key``)."""
        return self._file

    def reload_now(self) -> None:
        """Re-read the keys file at the next ``authenticate`` (after this process edited it)."""
        with self._lock:
            self._checked = time.monotonic() - self._interval - 1.0

    # ------------------------------------------------------------------------------ policy
    def check_model(self, principal: Principal, model: str) -> None:
        if not principal.policy.allows_model(model):
            allowed = ", ".join(principal.policy.models)
            raise AuthError(f"tenant {principal.tenant} may not use model {model!r}; its models: {allowed} "
                            f"(tenants.{principal.tenant}.models in the site config)", "permission_denied")

    def require_admin(self, principal: Principal, what: str) -> None:
        if not principal.is_admin:
            raise AuthError(f"{what} needs an admin key (tenant {principal.tenant} is not admin); use a key of a "
                            "tenant with admin = true", "permission_denied")

    def cache_salt(self, tenant: str) -> str:
        """The prefix-cache namespace of ``tenant``'s requests: its own with ``isolate-prefix-cache``,
        else the shared one ("")."""
        policy = self._policies.get(tenant)
        return f"tenant:{tenant}" if policy is not None and policy.isolate_prefix_cache else ""

    def priority_class(self, principal: Principal, requested: str) -> str:
        """The lower of ``requested`` and the tenant's ``max-priority`` ("interactive" > "batch")."""
        if requested not in PRIORITIES:
            raise ValueError(f"priority class must be one of {', '.join(PRIORITIES)}, got {requested!r}")
        return PRIORITIES[max(PRIORITIES.index(requested), PRIORITIES.index(principal.policy.max_priority))]

    # ------------------------------------------------------------------------------ reload
    def _signature(self) -> _Signature | None:
        assert self._file is not None
        try:
            st = os.stat(self._file.path)
        except FileNotFoundError:
            return None
        except OSError:
            return self._sig  # unreadable for a moment: keep what we have
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self._interval:
                return
            self._checked = now
            sig = self._signature()
            if sig == self._sig:
                return
            try:
                records = self._file.records()
            except HpcserveError as exc:
                if self._warned_sig != sig:
                    log.warning("keys file changed but cannot be read, keeping the %d keys loaded before: %s",
                                len(self._records), exc)
                    self._warned_sig = sig
                return  # _sig unchanged: retried at the next check, the warning is not repeated
            self._records, self._sig, self._warned_sig = records, sig, None
            log.info("keys file %s reloaded: %d active keys", self._file.path,
                     sum(r.is_active for r in records))

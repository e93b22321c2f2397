"""API keys: minting, hashing and the keys file that ``hpcserve keys`` manages. No grpc, no torch.

Interface::

    KEY_PREFIX = "hps_"
    new_key() -> str                       # "hps_" + 43 url-safe chars (256 random bits)
    hash_key(key) -> "sha256:<hex>"
    KeyRecord(key_id, tenant, digest, hint, created_at, revoked_at=None, note="")   .is_active
    KeysFile(path).records() -> list[KeyRecord]
    KeysFile(path).add(tenant, note="") -> (plaintext key, KeyRecord)
    KeysFile(path).revoke(key_id) -> KeyRecord
    lookup(records, key) -> KeyRecord | None

The file is JSON ``{"version": 1, "keys": [{key_id, tenant, digest, hint, created_at, revoked_at,
note}, ...]}``. Only digests are stored: the plaintext key is returned once by ``add`` and never
written anywhere. Writers (``add``/``revoke``) take an exclusive ``fcntl.flock`` on the sibling
``<file>.lock``, re-read the file under the lock, and replace it atomically (temp file in the same
directory, fsync, rename; both mode 0600), so concurrent ``hpcserve keys add`` calls all land and a
reader (the daemon, polling the file) never sees half a file. A missing parent directory is
created mode 0700.

Why plain SHA-256 and not bcrypt/scrypt/argon2: those slow hashes protect *low-entropy* secrets
(passwords) against offline guessing. Our keys are 256 random bits, which no amount of guessing can
find, so a slow hash buys nothing and would cost a hash per request; SHA-256 keeps the file useless
to a reader while a lookup stays microseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hpcserve.errors import HpcserveError

KEY_PREFIX = "hps_"
FILE_VERSION = 1
_HINT_CHARS = 8
_FIELDS = ("key_id", "tenant", "digest", "hint", "created_at", "revoked_at", "note")


def new_key() -> str:
    """A fresh API key: the ``hps_`` prefix (so leaked keys are recognisable) and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """``"sha256:" + hexdigest`` of the key (see the module docstring for why not a slow hash)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hint(key: str) -> str:
    """What ``hpcserve keys list`` shows of a key: its first 8 characters and an ellipsis."""
    return key[:_HINT_CHARS] + "…"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str  # "key_" + 12 hex digits; public, used to revoke
    tenant: str
    digest: str  # hash_key(key)
    hint: str  # key_hint(key)
    created_at: float  # unix time
    revoked_at: float | None = None
    note: str = ""

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


def lookup(records: Iterable[KeyRecord], key: str) -> KeyRecord | None:
    """The record whose digest matches ``key`` (active or not; the caller checks), else None.
    Digests are compared with ``hmac.compare_digest``."""
    digest = hash_key(key)
    found = None
    for rec in records:
        if hmac.compare_digest(rec.digest, digest):
            found = rec
    return found


def _record(path: Path, i: int, raw: object) -> KeyRecord:
    where = f"{path}: keys[{i}]"
    if not isinstance(raw, dict):
        raise HpcserveError(f"{where} is not an object; restore the file from a backup or remove it and "
                            "re-issue keys with `hpcserve keys add`")
    missing = [k for k in ("key_id", "tenant", "digest", "created_at") if k not in raw]
    if missing:
        raise HpcserveError(f"{where} lacks {', '.join(missing)}; the file was edited by hand or is damaged: "
                            "restore it, or remove that entry and re-issue the key with `hpcserve keys add`")
    kinds = {"key_id": str, "tenant": str, "digest": str, "hint": str, "note": str,
             "created_at": (int, float), "revoked_at": (int, float, type(None))}
    for name, kind in kinds.items():
        if name in raw and (not isinstance(raw[name], kind) or isinstance(raw[name], bool)):
            raise HpcserveError(f"{where}.{name} has the wrong type ({type(raw[name]).__name__}); the file is "
                                "damaged: restore it, or remove that entry and re-issue the key")
    if not raw["digest"].startswith("sha256:"):
        raise HpcserveError(f"{where}.digest is not a sha256: digest; entries must be written by "
                            "`hpcserve keys add`")
    return KeyRecord(**{k: raw[k] for k in _FIELDS if k in raw})


def _parse(path: Path, text: str) -> list[KeyRecord]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HpcserveError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); restore "
                            "the keys file from a backup or remove it and re-issue keys with `hpcserve keys add`"
                            ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise HpcserveError(f'{path}: expected a JSON object {{"version": 1, "keys": [...]}}; this is not an '
                            "hpcserve keys file (pass the right --keys-file)")
    if doc.get("version") != FILE_VERSION:
        raise HpcserveError(f"{path}: keys file version {doc.get('version')!r} is not supported (expected "
                            f"{FILE_VERSION}); use the hpcserve release that wrote it")
    records = [_record(path, i, raw) for i, raw in enumerate(doc["keys"])]
    ids = [r.key_id for r in records]
    dup = next((k for k in ids if ids.count(k) > 1), None)
    if dup is not None:
        raise HpcserveError(f"{path}: key id {dup} appears twice; remove one entry")
    return records


class KeysFile:
    """The hashed API-keys file at ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def records(self) -> list[KeyRecord]:
        """Every record in file order; [] when the file does not exist. Raises HpcserveError
        naming the file when it is unreadable or malformed."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except UnicodeDecodeError:
            raise HpcserveError(f"{self.path}: not UTF-8 text; this is not an hpcserve keys file") from None
        except OSError as exc:
            raise HpcserveError(f"{self.path}: cannot read the keys file ({exc.strerror or exc}); check its "
                                "permissions (it should be readable by the daemon's user only)") from None
        return _parse(self.path, text)

    def add(self, tenant: str, note: str = "") -> tuple[str, KeyRecord]:
        """Mint a key for ``tenant``, store its digest and return ``(plaintext key, record)``.
        The plaintext is not stored: this is the only time it is seen."""
        key = new_key()
        with self._locked():
            records = self.records()
            taken = {r.key_id for r in records}
            key_id = _new_key_id(taken)
            rec = KeyRecord(key_id, tenant, hash_key(key), key_hint(key), time.time(), None, note)
            self._write([*records, rec])
        return key, rec

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark ``key_id`` revoked (idempotent: an already revoked key keeps its first revocation time)."""
        with self._locked():
            records = self.records()
            for i, rec in enumerate(records):
                if rec.key_id == key_id:
                    if rec.is_active:
                        records[i] = rec = replace(rec, revoked_at=time.time())
                        self._write(records)
                    return rec
        known = f" among the {len(records)} in {self.path}" if records else f" ({self.path} holds no keys)"
        raise HpcserveError(f"no key with id {key_id!r}{known}; `hpcserve keys list` shows the ids")

    # ------------------------------------------------------------------------------- writing
    def _ensure_dir(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise HpcserveError(f"cannot create {parent} for the keys file ({exc.strerror or exc}); create it "
                                    "or choose another --keys-file / auth.keys-file") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_dir()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise HpcserveError(f"cannot open {self.lock_path} ({exc.strerror or exc}); the keys file's "
                                "directory must be writable by you") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, records: list[KeyRecord]) -> None:
        doc = {"version": FILE_VERSION, "keys": [asdict(r) for r in records]}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}-", suffix=".tmp", dir=self.path.parent)  # 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename durable; not every file system allows it
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _new_key_id(taken: set[str]) -> str:
    while True:
        key_id = "key_" + secrets.token_hex(6)
        if key_id not in taken:
            return key_id

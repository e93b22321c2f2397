"""BatchPolicy: completion windows and batch input by path (real files and symlinks in tmp dirs)."""

from __future__ import annotations

import pytest

from hpcserve.config_tables import TenantSection
from hpcserve.daemon.batch_policy import BatchPolicy
from hpcserve.daemon.tenants import AuthError, Principal
from hpcserve.errors import RequestError


def test_windows():
    p = BatchPolicy(("1h", "24h"), "24h")
    assert p.window("") == "24h" and p.window(None) == "24h" and p.window("1h") == "1h"
    for bad in ("1m", "2h", 24, "24 h"):
        with pytest.raises(RequestError, match=r"completion_window: must be one of '1h', '24h'"):
            p.window(bad)
    with pytest.raises(ValueError):
        BatchPolicy(("soon",))


def _principal(tenant: str, **kw) -> Principal:
    return Principal(tenant, "key_x", TenantSection(**kw))


def test_input_paths_resolved_inside_the_tenants_dirs(tmp_path):
    allowed, outside = tmp_path / "proj", tmp_path / "other"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.jsonl").write_text("{}\n")
    (outside / "secret.jsonl").write_text("{}\n")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "deep.jsonl").write_text("{}\n")
    (allowed / "esc.jsonl").symlink_to(outside / "secret.jsonl")
    (allowed / "inner.jsonl").symlink_to(allowed / "sub" / "deep.jsonl")  # a symlink that stays inside
    (tmp_path / "proj-evil").mkdir()  # a sibling sharing the prefix "proj"
    (tmp_path / "proj-evil" / "x.jsonl").write_text("{}\n")
    alice = _principal("alice", input_dirs=(str(allowed),))
    p = BatchPolicy()
    for ok in (allowed / "in.jsonl", allowed / "inner.jsonl", allowed / "sub" / "deep.jsonl"):
        f, name = p.open_input(alice, str(ok))
        assert f.read() == b"{}\n" and name == str(ok)
        f.close()
    for bad in (outside / "secret.jsonl", allowed / "esc.jsonl", f"{allowed}/../other/secret.jsonl",
                tmp_path / "proj-evil" / "x.jsonl", outside / "nope.jsonl"):
        with pytest.raises(AuthError, match="tenants.alice.input-dirs") as info:
            p.open_input(alice, str(bad))
        assert info.value.code == "permission_denied"
    with pytest.raises(RequestError, match="does not exist or is not readable"):
        p.open_input(alice, str(allowed / "missing.jsonl"))
    with pytest.raises(RequestError, match="does not exist or is not readable"):
        p.open_input(alice, str(allowed / "sub"))  # a directory
    with pytest.raises(RequestError, match="is relative"):
        p.open_input(alice, "proj/in.jsonl")
    with pytest.raises(AuthError, match="input-dirs is empty"):
        p.open_input(_principal("bob"), str(allowed / "in.jsonl"))
    admin = _principal("ops", admin=True)
    f, _ = p.open_input(admin, str(outside / "secret.jsonl"))
    f.close()

"""Tenants: the hashed keys file, authentication with live reload, policy checks, per-tenant limits
and the [tenants]/[auth]/[tls]/daemon.http site-config tables. Real files, real processes; the
limiter runs on an injected clock (no wall-clock timing is asserted)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from hpcserve.config import SiteConfig, TenantSection, load_config, render_defaults
from hpcserve.config_tables import ConfigError
from hpcserve.daemon.keys import KEY_PREFIX, KeysFile, hash_key, lookup, new_key
from hpcserve.daemon.limits import Limiter
from hpcserve.daemon.tenants import AuthError, Tenants
from hpcserve.errors import HpcserveError

NO_ENV: dict[str, str] = {}
POLICIES = {
    "ops": TenantSection(admin=True),
    "lab": TenantSection(models=("small", "big"), max_priority="batch"),
}


# ----------------------------------------------------------------------------------- keys file

def test_keys_file_round_trip_stores_only_digests(tmp_path):
    kf = KeysFile(tmp_path / "sub" / "keys.json")
    assert kf.records() == []  # missing file
    key, rec = kf.add("lab", note="alice")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert rec.tenant == "lab" and rec.note == "alice" and rec.is_active
    assert rec.key_id.startswith("key_") and len(rec.key_id) == 16 and int(rec.key_id[4:], 16) >= 0
    assert rec.digest == hash_key(key) and rec.hint == key[:8] + "…"
    text = kf.path.read_text()
    assert key not in text and key[8:20] not in text  # the plaintext is nowhere in the file
    assert json.loads(text)["version"] == 1
    assert stat.S_IMODE(kf.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(kf.path.parent.stat().st_mode) == 0o700
    assert [p.name for p in kf.path.parent.iterdir() if p.name.endswith(".tmp")] == []
    key2, rec2 = kf.add("ops")
    assert key2 != key and rec2.key_id != rec.key_id
    assert KeysFile(kf.path).records() == [rec, rec2]  # a fresh reader sees the same
    assert lookup(kf.records(), key) == rec and lookup(kf.records(), key2) == rec2
    assert lookup(kf.records(), new_key()) is None


def test_revoke(tmp_path):
    kf = KeysFile(tmp_path / "keys.json")
    _, rec = kf.add("lab")
    _, other = kf.add("lab")
    revoked = kf.revoke(rec.key_id)
    assert revoked.key_id == rec.key_id and not revoked.is_active and revoked.revoked_at >= rec.created_at
    assert kf.records() == [revoked, other]
    assert kf.revoke(rec.key_id) == revoked  # idempotent: the first revocation time stays
    with pytest.raises(HpcserveError, match=r"no key with id 'key_nope'.*hpcserve keys list"):
        kf.revoke("key_nope")
    with pytest.raises(HpcserveError, match="hpcserve keys list"):
        KeysFile(tmp_path / "empty.json").revoke("key_x")


@pytest.mark.parametrize("text, expect", [
    ("{not json", "not valid JSON (line 1"),
    ("[]", "expected a JSON object"),
    ('{"version": 2, "keys": []}', "version 2 is not supported"),
    ('{"version": 1, "keys": [3]}', "keys[0] is not an object"),
    ('{"version": 1, "keys": [{"key_id": "key_1", "tenant": "a"}]}', "keys[0] lacks digest, created_at"),
    ('{"version": 1, "keys": [{"key_id": "key_1", "tenant": "a", "digest": "md5:x", "created_at": 1}]}',
     "keys[0].digest is not a sha256"),
    ('{"version": 1, "keys": [{"key_id": 5, "tenant": "a", "digest": "sha256:x", "created_at": 1}]}',
     "keys[0].key_id has the wrong type"),
])
def test_malformed_keys_file_names_file_and_problem(tmp_path, text, expect):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(HpcserveError) as ei:
        KeysFile(path).records()
    msg = str(ei.value)
    assert msg.startswith(str(path)) and expect in msg and "\n" not in msg
    with pytest.raises(HpcserveError):  # a writer refuses to overwrite what it cannot read
        KeysFile(path).add("a")
    assert path.read_text() == text


def _add_many(path: str, tenant: str, n: int, start) -> None:
    start.wait()
    kf = KeysFile(path)
    for _ in range(n):
        kf.add(tenant)


def test_concurrent_adds_from_two_processes_all_land(tmp_path):
    path = str(tmp_path / "keys.json")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_add_many, args=(path, t, 25, start)) for t in ("ops", "lab")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    records = KeysFile(path).records()
    assert sorted(r.tenant for r in records) == ["lab"] * 25 + ["ops"] * 25
    assert len({r.key_id for r in records}) == 50 and len({r.digest for r in records}) == 50


# ------------------------------------------------------------------------------------- tenants

def test_authenticate_good_wrong_revoked_missing(tmp_path):
    kf = KeysFile(tmp_path / "keys.json")
    lab_key, lab = kf.add("lab")
    ops_key, _ = kf.add("ops")
    gone_key, gone = kf.add("lab")
    kf.revoke(gone.key_id)
    t = Tenants(POLICIES, kf.path, reload_interval_s=0)
    assert sorted(t.names) == ["lab", "ops"]
    p = t.authenticate(lab_key)
    assert (p.tenant, p.key_id, p.policy, p.is_admin) == ("lab", lab.key_id, POLICIES["lab"], False)
    assert t.authenticate(" " + ops_key + "\n").is_admin  # surrounding whitespace of a pasted key is ignored
    for bad, what in ((None, "no API key"), ("", "no API key"), (new_key(), "unknown API key"),
                      (lab_key[:-1], "unknown API key"), (gone_key, f"{gone.key_id} (tenant lab) was revoked")):
        with pytest.raises(AuthError) as ei:
            t.authenticate(bad)
        assert ei.value.code == "unauthenticated" and what in str(ei.value)
        assert "endpoint.json" in str(ei.value) or "keys add --tenant lab" in str(ei.value)
        if bad:
            assert bad not in str(ei.value) and bad[4:12] not in str(ei.value)  # never echoes the key


def test_key_of_an_unconfigured_tenant_is_refused(tmp_path):
    kf = KeysFile(tmp_path / "keys.json")
    key, _ = kf.add("former")
    t = Tenants(POLICIES, kf.path)
    with pytest.raises(AuthError) as ei:
        t.authenticate(key)
    assert ei.value.code == "unauthenticated"
    assert "tenant 'former'" in str(ei.value) and "[tenants.former]" in str(ei.value) and key not in str(ei.value)


def test_keys_added_or_revoked_later_take_effect_after_reload(tmp_path):
    kf = KeysFile(tmp_path / "keys.json")
    t = Tenants(POLICIES, kf.path, reload_interval_s=0)  # the file does not exist yet
    key, rec = kf.add("lab")
    assert t.authenticate(key).key_id == rec.key_id
    kf.revoke(rec.key_id)
    with pytest.raises(AuthError, match="was revoked"):
        t.authenticate(key)
    # a long reload interval: a key added now is not seen before the next check
    slow = Tenants(POLICIES, kf.path, reload_interval_s=3600)
    key2, _ = kf.add("ops")
    with pytest.raises(AuthError, match="unknown API key"):
        slow.authenticate(key2)
    assert t.authenticate(key2).tenant == "ops"


def test_malformed_keys_file_keeps_the_last_good_set(tmp_path, caplog):
    kf = KeysFile(tmp_path / "keys.json")
    key, _ = kf.add("lab")
    t = Tenants(POLICIES, kf.path, reload_interval_s=0)
    kf.path.write_text('{"version": 1, "keys": [')  # a hand edit gone wrong
    with caplog.at_level("WARNING", logger="hpcserve.daemon"):
        for _ in range(3):
            assert t.authenticate(key).tenant == "lab"
    warnings = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and str(kf.path) in warnings[0].getMessage()
    with pytest.raises(HpcserveError, match="not valid JSON"):  # at construction it is an error
        Tenants(POLICIES, kf.path)
    kf.path.unlink()  # fixed by removing the file: no keys any more
    with pytest.raises(AuthError, match="unknown API key"):
        t.authenticate(key)


def test_minted_key_replaces_the_previous_one(tmp_path):
    t = Tenants(POLICIES, None)
    first = t.mint_key("ops")
    p = t.authenticate(first)
    assert (p.tenant, p.key_id, p.is_admin) == ("ops", "endpoint", True)
    second = t.mint_key("lab")
    assert second != first and t.authenticate(second).tenant == "lab"
    with pytest.raises(AuthError, match="unknown API key"):
        t.authenticate(first)
    with pytest.raises(HpcserveError, match=r"tenant 'nope'.*defined: ops, lab"):
        t.mint_key("nope")


def test_check_model_require_admin_priority_class():
    t = Tenants(POLICIES, None)
    ops, lab = t.authenticate(t.mint_key("ops")), None
    lab = t.authenticate(t.mint_key("lab"))
    t.check_model(ops, "anything")  # "*"
    t.check_model(lab, "big")
    with pytest.raises(AuthError) as ei:
        t.check_model(lab, "huge")
    assert ei.value.code == "permission_denied"
    assert "tenant lab may not use model 'huge'" in str(ei.value) and "small, big" in str(ei.value)
    t.require_admin(ops, "drain")
    with pytest.raises(AuthError) as ei:
        t.require_admin(lab, "drain")
    assert ei.value.code == "permission_denied" and str(ei.value).startswith(
        "drain needs an admin key (tenant lab is not admin)")
    assert t.priority_class(ops, "interactive") == "interactive" and t.priority_class(ops, "batch") == "batch"
    assert t.priority_class(lab, "interactive") == "batch" and t.priority_class(lab, "batch") == "batch"
    with pytest.raises(ValueError):
        t.priority_class(ops, "urgent")
    with pytest.raises(ValueError):
        AuthError("x", "teapot")


# ------------------------------------------------------------------------------------ limiter

class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(clock, today=None, wall=None, **limits) -> Limiter:
    return Limiter({"a": TenantSection(**limits), "b": TenantSection()}, today or (lambda t: 0), clock,
                   wall or (lambda: 1_700_000_000.0))


def exhausted(fn) -> AuthError:
    with pytest.raises(AuthError) as ei:
        fn()
    assert ei.value.code == "resource_exhausted" and "\n" not in str(ei.value)
    return ei.value


def test_requests_per_minute_sliding_window():
    clock = FakeClock()
    lim = limiter(clock, requests_per_minute=3)
    for dt in (0, 10, 20):
        clock.t = 1000 + dt
        lim.admit("a", 5).finish()
    clock.t = 1030
    err = exhausted(lambda: lim.admit("a", 5))
    assert err.retry_after_s == 30  # the request at t=1000 leaves the window at 1060
    assert "tenants.a.requests-per-minute = 3" in str(err) and "retry in 30 s" in str(err)
    assert lim.snapshot()["a"]["requests_last_minute"] == 3  # the refused one was not charged
    lim.admit("b", 5).finish()  # other tenants are unaffected
    clock.t = 1059.5
    assert exhausted(lambda: lim.admit("a", 5)).retry_after_s == 1  # rounded up, at least 1
    clock.t = 1060
    lim.admit("a", 5).finish()
    assert exhausted(lambda: lim.admit("a", 5)).retry_after_s == 10


def test_tokens_per_minute_and_actual_correction():
    clock = FakeClock()
    lim = limiter(clock, tokens_per_minute=100)
    first = lim.admit("a", 60)
    clock.t = 1020
    lim.admit("a", 30).finish(actual_tokens=30)
    err = exhausted(lambda: lim.admit("a", 20))  # 60 + 30 + 20 > 100
    assert err.retry_after_s == 40 and "tenants.a.tokens-per-minute = 100" in str(err)
    assert "used 90 tokens" in str(err)
    first.finish(actual_tokens=10)  # it used far fewer than estimated: the charge shrinks
    assert lim.snapshot()["a"]["tokens_last_minute"] == 40
    lim.admit("a", 60).finish()  # 40 + 60 fits exactly
    err = exhausted(lambda: lim.admit("a", 50))
    assert err.retry_after_s == 60  # 10 (t=1000) then 30 (t=1020) must age out: at 1080
    too_big = exhausted(lambda: lim.admit("a", 101))
    assert too_big.retry_after_s is None and "this request alone needs 101 tokens" in str(too_big)
    assert "lower max_tokens" in str(too_big)
    clock.t = 2000
    assert exhausted(lambda: lim.admit("a", 101)).retry_after_s is None  # even with an empty window


def test_concurrency_finish_frees_the_slot_once():
    clock = FakeClock()
    lim = limiter(clock, max_concurrent_streams=2)
    one, two = lim.admit("a", 1), lim.admit("a", 1)
    err = exhausted(lambda: lim.admit("a", 1))
    assert err.retry_after_s == 1 and "tenants.a.max-concurrent-streams = 2" in str(err)
    assert lim.snapshot()["a"]["active_streams"] == 2
    one.finish()
    one.finish()  # double finish frees nothing more
    three = lim.admit("a", 1)
    exhausted(lambda: lim.admit("a", 1))
    with two:  # a lease is also a context manager
        pass
    assert two.finished and lim.snapshot()["a"]["active_streams"] == 1
    three.finish(actual_tokens=5)
    assert lim.snapshot()["a"]["active_streams"] == 0


def test_checks_run_in_order_and_charge_nothing_when_refused():
    clock = FakeClock()
    lim = limiter(clock, max_concurrent_streams=1, requests_per_minute=1)
    lease = lim.admit("a", 1)
    err = exhausted(lambda: lim.admit("a", 1))
    assert "max-concurrent-streams" in str(err)  # concurrency is checked before the rate
    lease.finish()
    err = exhausted(lambda: lim.admit("a", 1))
    assert "requests-per-minute" in str(err)
    assert lim.snapshot()["a"] == {"active_streams": 0, "requests_last_minute": 1, "tokens_last_minute": 1,
                                   "tokens_today": 0, "daily_token_quota": 0}


def test_daily_quota_resets_at_utc_midnight():
    used = {"a": 0}
    wall = FakeClock(1_700_000_000.0 + 3600)  # 1_700_006_400 is not a multiple of 86400
    lim = limiter(FakeClock(), today=lambda t: used.get(t, 0), wall=wall, daily_token_quota=1000)
    lim.admit("a", 900).finish()
    assert lim.exhausted_tenants() == set()
    used["a"] = 1000  # the usage meter counted the finished tokens
    err = exhausted(lambda: lim.admit("a", 1))
    next_midnight = (math.floor(wall.t / 86400) + 1) * 86400
    assert err.retry_after_s == math.ceil(next_midnight - wall.t) and 0 < err.retry_after_s <= 86400
    assert "tenants.a.daily-token-quota = 1000" in str(err) and "00:00 UTC" in str(err)
    assert lim.exhausted_tenants() == {"a"}
    assert lim.snapshot()["a"]["tokens_today"] == 1000 and lim.snapshot()["a"]["daily_token_quota"] == 1000
    lim.admit("b", 10**9).finish()  # no quota: unlimited
    used["a"] = 0  # a new day
    lim.admit("a", 1).finish()
    assert lim.exhausted_tenants() == set()


def test_unknown_tenant_is_refused():
    with pytest.raises(AuthError, match="tenant 'zed' is not defined"):
        limiter(FakeClock()).admit("zed", 1)


# ------------------------------------------------------------------------------------- config

def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text), env=NO_ENV)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "site.toml"))
    return msg


def test_default_tenants_and_keys_path(tmp_path):
    c = load_config(None, env=NO_ENV)
    assert c.tenants == {"default": TenantSection(admin=True)} and c.auth.endpoint_tenant == "default"
    assert c.tenants["default"].models == ("*",) and c.tenants["default"].requests_per_minute == 0
    assert c.keys_path == c.daemon.state_path / "keys.json"
    assert not c.tls.enabled and c.daemon.http == "" and c.daemon.http_host_port is None
    c = load_config(write(tmp_path, '[auth]\nkeys-file = "$HOME/k.json"\n'), env=NO_ENV)
    assert c.keys_path == Path(os.path.expandvars("$HOME/k.json"))
    assert load_config(None, env={"HPCSERVE_STATE_DIR": str(tmp_path)}).keys_path == tmp_path / "keys.json"


def test_tenant_tables_parse_and_replace_the_default(tmp_path):
    c = load_config(write(tmp_path, """
[auth]
endpoint-tenant = "ops"
[tenants.ops]
admin = true
[tenants.alice-lab]
models = ["small", "big"]
max-priority = "batch"
requests-per-minute = 10
tokens-per-minute = 5000
daily-token-quota = 100000
max-concurrent-streams = 2
[tenants."lab.b"]
"""), env=NO_ENV)
    assert list(c.tenants) == ["ops", "alice-lab", "lab.b"]
    assert c.tenants["ops"] == TenantSection(admin=True)
    assert c.tenants["alice-lab"] == TenantSection(models=("small", "big"), max_priority="batch",
                                                   requests_per_minute=10, tokens_per_minute=5000,
                                                   daily_token_quota=100000, max_concurrent_streams=2)
    assert c.tenants["lab.b"] == TenantSection() and hash(c.tenants["alice-lab"])  # hashable (tuple models)
    assert TenantSection(models=["x"]).models == ("x",)


@pytest.mark.parametrize("text, expect", [
    ("[tenants.alice]\nrequests-per-minute = -1\n",
     ["tenants.alice.requests-per-minute: must be >= 0, got -1"]),
    ('[tenants.alice]\nmax-priority = "urgent"\n', ["tenants.alice.max-priority", "interactive, batch", "'urgent'"]),
    ('[tenants.alice]\nmodels = "demo"\n', ["tenants.alice.models", "expected a list of strings", 'models = ["*"]']),
    ("[tenants.alice]\nmodels = [1]\n", ["tenants.alice.models", "expected a list of strings"]),
    ("[tenants.alice]\nmodels = []\n", ["tenants.alice.models", "is empty"]),
    ('[tenants.alice]\nmodels = [""]\n', ["tenants.alice.models", "empty name"]),
    ('[tenants.alice]\nadmin = "yes"\n', ["tenants.alice.admin", "expected true or false"]),
    ("[tenants.alice]\ndaily-token-quota = 1.5\n", ["tenants.alice.daily-token-quota", "expected an integer"]),
    ("[tenants.alice]\nrequests-per-min = 3\n",
     ["unknown key tenants.alice.requests-per-min", "did you mean 'requests-per-minute'",
      "valid keys in [tenants.NAME]: models, max-priority"]),
    ("[tenants.alice]\nmax_priority = 'batch'\n", ["tenants.alice.max_priority", "kebab-case"]),
    ('[tenants."-bad"]\n', ["tenants.-bad", "tenant name"]),
    ("[tenants]\nalice = 3\n", ["tenants.alice must be a table"]),
    ("[tenants]\n", ["[tenants] defines no tenant"]),
    ("tenants = 3\n", ["tenants must be a table of tables"]),
    ("[tenant.alice]\n", ["unknown table [tenant]", "did you mean 'tenants'"]),
    ('[tenants.alice]\n[auth]\nendpoint-tenant = "bob"\n',
     ["auth.endpoint-tenant", "'bob' is not a defined tenant (defined: alice)", "[tenants.bob]",
      'endpoint-tenant = ""']),
    ("[tenants.alice]\n", ["auth.endpoint-tenant", "'default' is not a defined tenant"]),  # the default needs one
    ('[tls]\ncert-file = "/c.pem"\n', ["tls.key-file: is not set but tls.cert-file is", "set both"]),
    ('[tls]\nkey-file = "/k.pem"\n', ["tls.cert-file: is not set but tls.key-file is"]),
    ('[tls]\ncert-file = ""\nkey-file = "/k.pem"\n', ["tls.cert-file: is empty"]),
    ('[daemon]\nhttp = "8000"\n', ["daemon.http", "expected host:port", "'8000'", 'http = ""']),
    ('[daemon]\nhttp = "localhost:70000"\n', ["daemon.http", "port 0-65535"]),
    ("[auth]\nkeys = 1\n", ["unknown key auth.keys", "keys-file, endpoint-tenant"]),
])
def test_bad_tenant_auth_tls_http_values(tmp_path, text, expect):
    msg = config_error(tmp_path, text)
    for part in expect:
        assert part in msg, msg


def test_valid_tls_http_and_no_endpoint_tenant(tmp_path):
    c = load_config(write(tmp_path, '[tenants.alice]\n[auth]\nendpoint-tenant = ""\n'
                                    '[tls]\ncert-file = "~/c.pem"\nkey-file = "~/k.pem"\n'
                                    '[daemon]\nhttp = "[::1]:0"\n'), env=NO_ENV)
    assert c.tls.enabled and c.tls.cert_file == "~/c.pem"  # files are not checked at load
    assert c.daemon.http_host_port == ("::1", 0) and list(c.tenants) == ["alice"]
    env = load_config(None, env={"HPCSERVE_HTTP": "0.0.0.0:8000"})
    assert env.daemon.http_host_port == ("0.0.0.0", 8000)
    with pytest.raises(ConfigError, match="environment variable HPCSERVE_HTTP: daemon.http"):
        load_config(None, env={"HPCSERVE_HTTP": "nope"})


def test_direct_construction_checks_tenants():
    with pytest.raises(ConfigError, match="auth.endpoint-tenant"):
        SiteConfig(tenants={"x": TenantSection()})
    with pytest.raises(ConfigError, match=r"tenants\.a b: a tenant name"):
        SiteConfig(tenants={"a b": TenantSection(), "default": TenantSection()})
    with pytest.raises(ConfigError, match=r"must be >= 0"):
        TenantSection(max_concurrent_streams=-2)


def test_rendered_defaults_hold_the_default_tenant(tmp_path):
    text = render_defaults()
    assert "[tenants.default]" in text and "admin = true" in text and 'models = ["*"]' in text
    assert load_config(write(tmp_path, text), env=NO_ENV).tenants == SiteConfig().tenants


def test_precheck_refuses_what_admit_would_and_charges_nothing():
    clock = FakeClock()
    lim = limiter(clock, requests_per_minute=2, tokens_per_minute=100, max_concurrent_streams=5)
    lim.precheck("a")  # nothing used yet
    lim.admit("a", 100).finish()  # the token window is now full
    err = exhausted(lambda: lim.precheck("a"))
    assert "tokens-per-minute" in str(err) and err.retry_after_s == 60
    clock.t += 61
    lim.precheck("a")
    lim.admit("a", 1).finish()
    lim.admit("a", 1).finish()
    assert "requests-per-minute" in str(exhausted(lambda: lim.precheck("a")))
    before = lim.snapshot()["a"]
    for _ in range(3):
        exhausted(lambda: lim.precheck("a"))
    assert lim.snapshot()["a"] == before  # refusals are never charged
    lim.precheck("b")  # other tenants are unaffected

"""``hpcserve keys add | list | revoke`` on real files: through click's CliRunner (the real command
group, in-process) and once through the installed ``hpcserve`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcserve.cli import main
from hpcserve.config import ENV_VARS
from hpcserve.daemon.keys import KeysFile, hash_key
from hpcserve.daemon.tenants import Tenants

SITE = """
[daemon]
state-dir = "{state}"
[auth]
endpoint-tenant = "ops"
[tenants.ops]
admin = true
[tenants.alice-lab]
max-priority = "batch"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(main, ["keys", *args])
    if ok:
        assert r.exit_code == 0, (r.output, r.stderr)
    return r


@pytest.fixture()
def site(tmp_path) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(SITE.format(state=tmp_path / "state"))
    return p


def test_add_list_revoke_with_a_site_config(tmp_path, site):
    r = run("add", "--config", str(site), "--tenant", "alice-lab", "--note", "alice's laptop")
    key = r.stdout.strip()
    assert r.stdout == key + "\n" and key.startswith("hps_")  # stdout holds only the key
    assert "store the key now" in r.stderr and "only its hash is kept" in r.stderr
    path = tmp_path / "state" / "keys.json"  # <daemon.state-dir>/keys.json
    (rec,) = KeysFile(path).records()
    assert rec.tenant == "alice-lab" and rec.note == "alice's laptop" and rec.digest == hash_key(key)
    assert key not in path.read_text()
    assert rec.key_id in r.stderr

    key2 = run("add", "--config", str(site), "--tenant", "ops").stdout.strip()
    lines = run("list", "--config", str(site)).stdout.splitlines()
    assert lines[0].split() == ["KEY", "ID", "TENANT", "HINT", "CREATED", "(UTC)", "STATUS", "NOTE"]
    assert len(lines) == 3 and rec.key_id in lines[1] and "alice-lab" in lines[1] and "active" in lines[1]
    assert "alice's laptop" in lines[1] and key[:8] + "…" in lines[1] and key not in "\n".join(lines)

    r = run("revoke", "--config", str(site), rec.key_id)
    assert r.stdout == "" and f"{rec.key_id} (tenant alice-lab) is revoked" in r.stderr
    rows = json.loads(run("list", "--config", str(site), "--json").stdout)
    assert [(x["key_id"], x["tenant"], x["status"]) for x in rows] == [
        (rec.key_id, "alice-lab", "revoked"), (KeysFile(path).records()[1].key_id, "ops", "active")]
    assert rows[0]["revoked_at"] >= rows[0]["created_at"] and "digest" not in rows[0]
    only_ops = json.loads(run("list", "--config", str(site), "--json", "--tenant", "ops").stdout)
    assert [x["tenant"] for x in only_ops] == ["ops"]

    # what the CLI wrote is what a daemon's Tenants accepts and refuses
    from hpcserve.config import load_config

    cfg = load_config(site)
    t = Tenants(cfg.tenants, cfg.keys_path, reload_interval_s=0)
    assert t.authenticate(key2).tenant == "ops"
    with pytest.raises(Exception, match="was revoked"):
        t.authenticate(key)


def test_unknown_tenant_and_unknown_key_are_one_line_errors(tmp_path, site):
    r = run("add", "--config", str(site), "--tenant", "bob", ok=False)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "tenant 'bob' is not defined in" in r.stderr and "ops, alice-lab" in r.stderr
    assert "[tenants.bob]" in r.stderr
    assert not (tmp_path / "state" / "keys.json").exists()

    r = run("revoke", "--config", str(site), "key_000000000000", ok=False)
    assert r.exit_code == 2 and "no key with id 'key_000000000000'" in r.stderr and "hpcserve keys list" in r.stderr

    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = run("list", "--keys-file", str(bad), ok=False)
    assert r.exit_code == 2 and str(bad) in r.stderr and "not valid JSON" in r.stderr


def test_without_config_only_the_default_tenant_and_state_dir(tmp_path, monkeypatch):
    state = tmp_path / "st"
    r = run("add", "--state-dir", str(state), "--tenant", "alice-lab", ok=False)
    assert r.exit_code == 2 and "defined tenants: default" in r.stderr and "--config FILE" in r.stderr
    key = run("add", "--state-dir", str(state), "--tenant", "default").stdout.strip()
    assert KeysFile(state / "keys.json").records()[0].digest == hash_key(key)
    # HPCSERVE_STATE_DIR is the default state dir, as for the rest of the CLI
    monkeypatch.setenv("HPCSERVE_STATE_DIR", str(state))
    assert len(json.loads(run("list", "--json").stdout)) == 1
    # --keys-file wins over the state dir; an empty file lists nothing (a note on stderr)
    r = run("list", "--keys-file", str(tmp_path / "none.json"))
    assert r.stdout == "" and "no keys in" in r.stderr


def test_keys_file_from_config_and_orphan_note(tmp_path, site):
    kf = tmp_path / "elsewhere" / "k.json"
    text = site.read_text().replace('endpoint-tenant = "ops"', f'endpoint-tenant = "ops"\nkeys-file = "{kf}"')
    site.write_text(text)
    run("add", "--config", str(site), "--tenant", "ops")
    assert len(KeysFile(kf).records()) == 1 and not (tmp_path / "state" / "keys.json").exists()
    KeysFile(kf).add("gone")  # a tenant since removed from the config
    r = run("list", "--config", str(site))
    assert "gone" in r.stdout and "tenant(s) gone are not defined" in r.stderr


def test_help_texts():
    for args in ((), ("add",), ("list",), ("revoke",)):
        r = run(*args, "--help")
        assert "Usage: main keys" in r.stdout or "Usage: hpcserve keys" in r.stdout
    assert "only its SHA-256 digest" in " ".join(run("add", "--help").stdout.split())
    assert "--keys-file" in run("revoke", "--help").stdout and "--state-dir" in run("list", "--help").stdout
    assert "keys" in CliRunner().invoke(main, ["--help"]).stdout


def test_installed_entry_point(tmp_path, site):
    exe = Path(sys.executable).parent / "hpcserve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hpcserve"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    r = subprocess.run([*cmd, "keys", "add", "--config", str(site), "--tenant", "ops"], capture_output=True,
                       text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert KeysFile(tmp_path / "state" / "keys.json").records()[0].digest == hash_key(key)
    r = subprocess.run([*cmd, "keys", "revoke", "--config", str(site), "key_x"], capture_output=True, text=True,
                       timeout=60, env=env, check=False)
    assert r.returncode == 2 and r.stderr.startswith("hpcserve: error: no key with id 'key_x'")

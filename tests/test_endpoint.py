"""The endpoint file (0600, atomic) and how clients resolve the daemon's address."""

from __future__ import annotations

import json
import stat

import pytest

from hpcserve.daemon.endpoint import (
    EndpointNotFound,
    mark_draining,
    read_endpoint,
    remove_endpoint,
    resolve_endpoint,
    write_endpoint,
)


def test_write_is_0600_and_round_trips(tmp_path):
    path = write_endpoint(tmp_path / "state", "127.0.0.1:50051", token="s3cret", http="127.0.0.1:8000")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ep = read_endpoint(tmp_path / "state")
    assert (ep.address, ep.token, ep.http, ep.draining) == ("127.0.0.1:50051", "s3cret", "127.0.0.1:8000", False)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["endpoint.json"]  # no temp files left


def test_draining_and_removal(tmp_path):
    write_endpoint(tmp_path, "127.0.0.1:1234", token="t")
    mark_draining(tmp_path)
    ep = read_endpoint(tmp_path)
    assert ep.draining and ep.token == "t"
    assert stat.S_IMODE((tmp_path / "endpoint.json").stat().st_mode) == 0o600
    remove_endpoint(tmp_path)
    remove_endpoint(tmp_path)  # idempotent
    assert read_endpoint(tmp_path) is None


def test_resolution_order(tmp_path):
    write_endpoint(tmp_path, "127.0.0.1:1111", token="file-token")
    env = {"HPCSERVE_STATE_DIR": str(tmp_path)}
    assert resolve_endpoint(env=env).address == "127.0.0.1:1111"
    env["HPCSERVE_ENDPOINT"] = "127.0.0.1:2222"
    assert resolve_endpoint(env=env).address == "127.0.0.1:2222"
    assert resolve_endpoint("127.0.0.1:3333", env=env).address == "127.0.0.1:3333"
    assert resolve_endpoint(state_dir=tmp_path, env={}).token == "file-token"


def test_clear_errors(tmp_path):
    with pytest.raises(EndpointNotFound, match="no hpcserve daemon found.*hpcserve serve"):
        resolve_endpoint(env={"HPCSERVE_STATE_DIR": str(tmp_path / "empty")})
    with pytest.raises(EndpointNotFound, match="--endpoint: 'nohost' is not host:port"):
        resolve_endpoint("nohost", env={})
    with pytest.raises(EndpointNotFound, match="HPCSERVE_ENDPOINT"):
        resolve_endpoint(env={"HPCSERVE_ENDPOINT": "h:99999"})
    (tmp_path / "endpoint.json").write_text("{not json")
    with pytest.raises(EndpointNotFound, match="unreadable endpoint file"):
        resolve_endpoint(state_dir=tmp_path, env={})
    (tmp_path / "endpoint.json").write_text(json.dumps({"token": "x"}))
    with pytest.raises(EndpointNotFound, match="has no address"):
        resolve_endpoint(state_dir=tmp_path, env={})


def test_tls_ca_round_trips_and_old_files_still_load(tmp_path):
    write_endpoint(tmp_path, "127.0.0.1:50051", token="t", tls_ca=tmp_path / "certs" / "server.pem")
    path = tmp_path / "endpoint.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["tls_ca"] == str(tmp_path / "certs" / "server.pem")
    assert read_endpoint(tmp_path).tls_ca == str(tmp_path / "certs" / "server.pem")
    mark_draining(tmp_path)  # the rewrite keeps it
    ep = read_endpoint(tmp_path)
    assert ep.draining and ep.tls_ca == str(tmp_path / "certs" / "server.pem")
    write_endpoint(tmp_path, "127.0.0.1:50051", token="t")  # plaintext daemon: no trust root
    assert read_endpoint(tmp_path).tls_ca is None
    # a file written before tls_ca existed
    path.write_text(json.dumps({"address": "127.0.0.1:7", "token": "old", "pid": 1, "draining": False}))
    ep = read_endpoint(tmp_path)
    assert (ep.address, ep.token, ep.tls_ca) == ("127.0.0.1:7", "old", None)
    assert [p.name for p in tmp_path.iterdir()] == ["endpoint.json"]

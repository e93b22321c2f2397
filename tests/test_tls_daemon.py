"""End-to-end TLS: a real daemon with ``[tls]`` (a certificate made in the test) serves gRPC and
the OpenAI-compatible HTTP API over TLS; its worker rank joins over the TLS WorkerLink.

- ``hpcserve`` CLI and ``Client`` find the trust root in endpoint.json and chat over gRPC+TLS;
- the openai SDK chats over HTTPS when it trusts the certificate, and fails when it does not;
- a plaintext gRPC client and a plain-HTTP client are refused."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import grpc
import httpx2
import openai
import pytest
from daemon_harness import Daemon, reap_all
from tls_util import make_cert

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()


@pytest.fixture(scope="module")
def tls_daemon(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-daemon")
    cert, key = make_cert(root / "tls")
    other, _ = make_cert(root / "other", name="other")
    config = root / "site.toml"
    config.write_text(f'[tls]\ncert-file = "{cert}"\nkey-file = "{key}"\n')
    d = Daemon(root / "state", tiny_model_factory("llama"), ranks=1,
               extra_args=("--config", str(config), "--http", "127.0.0.1:0")).start()
    ep = json.loads((root / "state" / "endpoint.json").read_text())
    yield {"daemon": d, "cert": cert, "other": other, "ep": ep, "state": root / "state"}
    assert d.stop() == 0, d.log_tail()


def test_endpoint_file_names_the_trust_root(tls_daemon):
    ep = tls_daemon["ep"]
    assert ep["tls_ca"] == str(tls_daemon["cert"]) and ep["http"] and ep["token"]
    assert os.stat(tls_daemon["state"] / "endpoint.json").st_mode & 0o777 == 0o600


def test_grpc_over_tls_with_the_cli_and_the_client(tls_daemon):
    from hpcserve.api.client import Client

    out = subprocess.run([sys.executable, "-m", "hpcserve", "chat", "--state-dir", str(tls_daemon["state"]),
                          "--prompt", "hello over TLS", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with Client.connect(state_dir=str(tls_daemon["state"])) as client:
        chunks = list(client.chat_stream([{"role": "user", "content": "hello over TLS"}], max_tokens=6,
                                         temperature=0))
    assert chunks[-1].usage.completion_tokens >= 1
    # the worker rank joined over the TLS WorkerLink: the replica is connected and serving
    assert tls_daemon["daemon"].info().is_ready


def test_plaintext_grpc_is_refused(tls_daemon):
    ep = tls_daemon["ep"]
    with grpc.insecure_channel(ep["address"]) as ch, pytest.raises(grpc.RpcError) as err:
        serving_pb2_grpc.ServingStub(ch).GetServerInfo(
            pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {ep['token']}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _trust(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_openai_sdk_over_https(tls_daemon):
    ep = tls_daemon["ep"]
    trusted = openai.OpenAI(base_url=f"https://{ep['http']}/v1", api_key=ep["token"], max_retries=0,
                            http_client=httpx2.Client(verify=_trust(tls_daemon["cert"])), timeout=120)
    r = trusted.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        temperature=0)
    assert r.usage.completion_tokens >= 1
    stream = trusted.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                             temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    untrusted = openai.OpenAI(base_url=f"https://{ep['http']}/v1", api_key=ep["token"], max_retries=0,
                              http_client=httpx2.Client(verify=_trust(tls_daemon["other"])), timeout=30)
    with pytest.raises(openai.APIConnectionError):
        untrusted.models.list()
    plain = openai.OpenAI(base_url=f"http://{ep['http']}/v1", api_key=ep["token"], max_retries=0, timeout=30)
    with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
        plain.models.list()

"""Transport security: ``daemon/tls.py`` loading and binding, the API client's TLS channel and the
worker link over TLS (the worker secret: test_worker_secret.py). Real certificates (``tls_util``), real gRPC on
127.0.0.1:0 (a grpc.aio server with the standard health service, in a background thread), a
real aiohttp HTTPS server, real ``hpcserve worker`` ranks under the venv's mpiexec."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import threading
import warnings
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tls_util import make_cert, make_other_cert

from hpcserve.api.client import Client, ClientError, DaemonUnreachable, TlsVerificationFailed
from hpcserve.daemon.endpoint import write_endpoint
from hpcserve.daemon.tls import (
    TlsMaterial,
    bind_grpc,
    grpc_channel_credentials,
    http_ssl_context,
    load_tls,
)
from hpcserve.errors import HpcserveError


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("certs")
    return {"server": make_cert(d), "other": make_other_cert(d),
            "elsewhere": make_cert(d, hosts=("node-elsewhere.example.org",), name="elsewhere")}


@pytest.fixture(scope="module")
def tls(certs) -> TlsMaterial:
    return load_tls(*map(str, certs["server"]))


# ---------------------------------------------------------------- load_tls

def test_load_tls_unset_and_good_pair(certs):
    assert load_tls(None, None) is None
    assert load_tls("", "") is None
    cert, key = certs["server"]
    tls = load_tls(str(cert), str(key))
    assert (tls.cert_pem, tls.key_pem, tls.cert_path) == (cert.read_bytes(), key.read_bytes(), str(cert))
    assert "PRIVATE" not in repr(tls) and key.read_text() not in repr(tls)


def test_load_tls_errors_name_the_key_and_path(certs, tmp_path):
    cert, key = certs["server"]
    other_cert, other_key = certs["other"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(key.read_bytes() + cert.read_bytes())
    cases = [
        ((cert, None), r"tls\.cert-file is set but tls\.key-file is not"),
        ((None, key), r"tls\.key-file is set but tls\.cert-file is not"),
        ((tmp_path / "missing.pem", key), r"tls\.cert-file: .*missing\.pem does not exist"),
        ((cert, tmp_path / "missing.key"), r"tls\.key-file: .*missing\.key does not exist"),
        ((tmp_path, key), r"tls\.cert-file: .* is a directory"),
        ((cert, cert / "key.pem"), r"tls\.key-file: cannot read .*server\.pem/key\.pem \(Not a directory\)"),
        ((garbage, key), r"tls\.cert-file: .*garbage\.pem holds no PEM certificate"),
        ((broken, key), r"tls\.cert-file: .*broken\.pem is not a valid PEM certificate"),
        ((cert, garbage), r"tls\.key-file: .*garbage\.pem holds no PEM private key"),
        ((cert, other_key), r"tls\.key-file: .*other\.key is not the private key of the certificate in tls\.cert-f"),
        ((other_cert, key), r"tls\.key-file: .*server\.key is not the private key"),
        ((combined, key), r"tls\.cert-file: .*combined\.pem also holds a private key"),
    ]
    for (c, k), pattern in cases:
        with pytest.raises(HpcserveError, match=pattern) as info:
            load_tls(None if c is None else str(c), None if k is None else str(k))
        assert "\n" not in str(info.value)


def test_load_tls_refuses_an_encrypted_key_without_prompting(certs, tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert, key = certs["server"]
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(HpcserveError, match=r"tls\.key-file: .*enc\.key is encrypted"):
        load_tls(str(cert), str(enc))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_tls_unreadable_key(certs, tmp_path):
    cert, key = certs["server"]
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.read_bytes())
    locked.chmod(0)
    with pytest.raises(HpcserveError, match=r"tls\.key-file: cannot read .*locked\.key"):
        load_tls(str(cert), str(locked))


def test_tls_and_client_modules_stay_torch_free():
    import subprocess

    code = "import sys, hpcserve.daemon.tls, hpcserve.api.client; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- a TLS health server

class GrpcThread:
    """A grpc.aio server on its own event loop thread; ``start`` binds it with ``bind_grpc``. By default it
    serves the standard health service (SERVING)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None
        self.port = 0

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, tls: TlsMaterial | None, port: int = 0, servicers=None) -> GrpcThread:
        async def start():
            self.server = grpc.aio.server()
            if servicers is None:
                servicer = health.aio.HealthServicer()
                health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
                await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            else:
                servicers(self.server)
            bound = bind_grpc(self.server, "127.0.0.1", port, tls)
            if bound:
                await self.server.start()
            return bound

        self.port = self.call(start())
        return self

    def bind_another(self, host: str, port: int, tls: TlsMaterial | None, options=()) -> int:
        async def bind():
            return bind_grpc(grpc.aio.server(options=list(options)), host, port, tls)
        return self.call(bind())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def stop():
            if self.server is not None and self.port:
                await self.server.stop(None)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:  # handlers' helper tasks (WorkerPool.Connect's queue reads)
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def HealthServer(tls: TlsMaterial | None, port: int = 0) -> GrpcThread:
    return GrpcThread().start(tls, port)


@pytest.fixture
def tls_server(tls):
    s = HealthServer(tls)
    assert s.port > 0
    yield s
    s.stop()


@pytest.fixture
def plain_server():
    s = HealthServer(None)
    assert s.port > 0
    yield s
    s.stop()


def _check(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_grpc_tls_right_ca_serves(tls_server, certs):
    with grpc.secure_channel(tls_server.address, grpc_channel_credentials(certs["server"][0].read_bytes())) as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(tls_server.address, grpc_channel_credentials(certs["server"][0].read_text())) as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING  # PEM as str works too


@pytest.mark.parametrize("trust", ["other", "system", "plaintext"])
def test_grpc_tls_refuses_wrong_ca_and_plaintext(tls_server, certs, trust):
    if trust == "plaintext":
        channel = grpc.insecure_channel(tls_server.address)
    else:
        ca = certs["other"][0].read_bytes() if trust == "other" else None
        channel = grpc.secure_channel(tls_server.address, grpc_channel_credentials(ca))
    with channel, pytest.raises(grpc.RpcError) as info:
        _check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    if trust != "plaintext":
        assert "handshake" in info.value.details().lower()


def test_bind_grpc_plaintext_in_use_and_ipv6(tls_server, plain_server, tls):
    with grpc.insecure_channel(plain_server.address) as ch:
        assert _check(ch) == health_pb2.HealthCheckResponse.SERVING
    no_reuse = [("grpc.so_reuseport", 0)]
    assert tls_server.bind_another("127.0.0.1", tls_server.port, tls, no_reuse) == 0  # in use, as grpc says
    assert tls_server.bind_another("127.0.0.1", plain_server.port, None, no_reuse) == 0
    assert tls_server.bind_another("192.0.2.1", 0, tls) == 0  # not an address of this host
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert tls_server.bind_another("::1", 0, tls) > 0


# ---------------------------------------------------------------- HTTPS (aiohttp)

def test_http_ssl_context_serves_tls12_or_newer(tls, certs):
    from aiohttp import ClientSession, client_exceptions, web

    async def main():
        app = web.Application()
        async def ping(request):
            return web.Response(text=request.transport.get_extra_info("ssl_object").version())

        app.router.add_get("/ping", ping)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=http_ssl_context(tls))
        await site.start()
        port = runner.addresses[0][1]
        try:
            good = ssl.create_default_context(cafile=str(certs["server"][0]))
            async with ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/ping", ssl=good) as resp:
                    version = await resp.text()  # as the server saw it
                wrong = ssl.create_default_context(cafile=str(certs["other"][0]))
                with pytest.raises(client_exceptions.ClientConnectorCertificateError):
                    await session.get(f"https://127.0.0.1:{port}/ping", ssl=wrong)
                old = ssl.create_default_context(cafile=str(certs["server"][0]))
                with warnings.catch_warnings():  # a TLS 1.1 client on purpose
                    warnings.simplefilter("ignore", DeprecationWarning)
                    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                    old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.set_ciphers("ALL:@SECLEVEL=0")
                with pytest.raises(client_exceptions.ClientConnectorError):
                    await session.get(f"https://127.0.0.1:{port}/ping", ssl=old)
            return version
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) in ("TLSv1.2", "TLSv1.3")


# ---------------------------------------------------------------- the API client

def _state(tmp_path: Path, address: str, tls_ca=None, name: str = "state") -> Path:
    state = tmp_path / name
    write_endpoint(state, address, token="t0k", tls_ca=tls_ca)
    return state


def test_client_connects_over_tls_from_the_endpoint_file(tls_server, certs, tmp_path):
    state = _state(tmp_path, tls_server.address, tls_ca=certs["server"][0])
    with Client.connect(None, state, timeout=10, env={}) as client:
        assert client._wait_ready(10, connect=False)  # READY: the handshake with the test certificate passed
        assert str(certs["server"][0]) in client.tls_source
        assert _check(client._channel) == health_pb2.HealthCheckResponse.SERVING
    # an address given by --endpoint uses the state dir file's trust root when that file names it
    with Client.connect(tls_server.address, state, timeout=10, env={}) as client:
        assert _check(client._channel) == health_pb2.HealthCheckResponse.SERVING


def test_client_wrong_ca_is_one_line_tls_error(tls_server, certs, tmp_path):
    state = _state(tmp_path, tls_server.address, tls_ca=certs["other"][0])
    with pytest.raises(TlsVerificationFailed) as info:
        Client.connect(None, state, timeout=10, env={})
    msg = str(info.value)
    assert "\n" not in msg and info.value.code is None
    assert f"TLS verification of the hpcserve daemon at {tls_server.address} failed" in msg
    assert "not trusted" in msg and "HPCSERVE_TLS_CA" in msg and str(certs["other"][0]) in msg


def test_client_env_trust_root_wins_over_the_file(tls_server, certs, tmp_path):
    right, wrong = certs["server"][0], certs["other"][0]
    state = _state(tmp_path, tls_server.address, tls_ca=wrong)
    with Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": str(right)}) as client:
        assert _check(client._channel) == health_pb2.HealthCheckResponse.SERVING
        assert "HPCSERVE_TLS_CA" in client.tls_source
    state = _state(tmp_path, tls_server.address, tls_ca=right, name="state2")
    with pytest.raises(TlsVerificationFailed, match="not trusted.*HPCSERVE_TLS_CA"):
        Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": str(wrong)})
    # system roots: the self-signed test certificate is not among them
    with pytest.raises(TlsVerificationFailed, match="trust root: HPCSERVE_TLS_CA=system"):
        Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": "system"})
    # plaintext endpoint file + HPCSERVE_TLS_CA: TLS all the same
    state = _state(tmp_path, tls_server.address, name="state3")
    with Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": str(right)}) as client:
        assert _check(client._channel) == health_pb2.HealthCheckResponse.SERVING


def test_client_certificate_for_another_host(certs, tmp_path):
    server = HealthServer(load_tls(*map(str, certs["elsewhere"])))
    try:
        state = _state(tmp_path, server.address, tls_ca=certs["elsewhere"][0])
        with pytest.raises(TlsVerificationFailed, match="its certificate does not name 127.0.0.1"):
            Client.connect(None, state, timeout=10, env={})
    finally:
        server.stop()


def test_client_bad_trust_root_files(tls_server, tmp_path):
    state = _state(tmp_path, tls_server.address, tls_ca=tmp_path / "gone.pem")
    with pytest.raises(ClientError, match=r"cannot read the TLS trust root .*gone\.pem \(from the tls_ca of "):
        Client.connect(None, state, timeout=10, env={})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ClientError, match=r"junk\.pem \(from HPCSERVE_TLS_CA\) holds no PEM certificate"):
        Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": str(junk)})


def test_client_tls_against_plaintext_and_plaintext_against_tls(tls_server, plain_server, certs, tmp_path):
    with Client.connect(None, _state(tmp_path, plain_server.address, name="plain"), timeout=10, env={}) as client:
        assert client.tls_source is None  # no trust root anywhere: plaintext, as before
        assert _check(client._channel) == health_pb2.HealthCheckResponse.SERVING
    state = _state(tmp_path, plain_server.address, tls_ca=certs["server"][0])
    with pytest.raises(TlsVerificationFailed, match="does not speak TLS.*the endpoint file says it serves TLS"):
        Client.connect(None, state, timeout=10, env={})
    with pytest.raises(TlsVerificationFailed, match="does not speak TLS.*unset HPCSERVE_TLS_CA"):
        Client.connect(None, state, timeout=10, env={"HPCSERVE_TLS_CA": str(certs["server"][0])})
    state = _state(tmp_path, tls_server.address, name="plain-state")
    with pytest.raises(DaemonUnreachable, match="if that daemon serves TLS, set HPCSERVE_TLS_CA") as info:
        Client.connect(None, state, timeout=10, env={})
    assert "\n" not in str(info.value)


def test_client_call_after_the_daemon_changed_certificate(certs, tmp_path):
    """A daemon restarted on the same port with a certificate the client does not trust: the next
    call is a TLS error, not 'daemon unreachable'."""
    first = HealthServer(load_tls(*map(str, certs["server"])))
    state = _state(tmp_path, first.address, tls_ca=certs["server"][0])
    client = Client.connect(None, state, timeout=10, env={})
    try:
        port = first.port
        first.stop()
        second = HealthServer(load_tls(*map(str, certs["other"])), port=port)
        try:
            assert second.port == port
            with pytest.raises(TlsVerificationFailed, match="not trusted"):
                client.server_info()
        finally:
            second.stop()
    finally:
        client.close()


# ---------------------------------------------------------------- the worker link over TLS

class _Router:
    """What WorkerPool calls back; records it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_ready(self) -> None:
        self.events.append("ready")

    def on_lost(self, reason: str) -> None:
        self.events.append(f"lost: {reason}")

    def on_outputs(self, replica, outputs) -> None:
        pass


def _pool(tmp_path: Path, **kw):
    from hpcserve.daemon.workers import WorkerPool

    return WorkerPool(num_ranks=1, launcher=[], engine_fields={}, link_address="", log_dir=tmp_path / "logs",
                      restart_limit=0, start_timeout_s=60, router=_Router(), **kw)


def _serve_pool(pool, tls: TlsMaterial | None) -> GrpcThread:
    from hpcserve.api.v1 import worker_pb2_grpc

    return GrpcThread().start(tls, servicers=lambda server: worker_pb2_grpc.add_WorkerLinkServicer_to_server(pool,
                                                                                                            server))


def test_leader_link_dials_over_tls(tls, certs, tmp_path, monkeypatch):
    from hpcserve.api.v1 import worker_pb2 as wpb
    from hpcserve.cluster.worker import LeaderLink, LinkLost

    pool = _pool(tmp_path)
    pool._secret = "s3cret"  # what a launch sets
    server = _serve_pool(pool, tls)
    try:
        monkeypatch.setenv("HPCSERVE_WORKER_TLS_CA", certs["server"][0].read_text())
        link = LeaderLink(server.address, timeout=10)
        link.send(wpb.WorkerMessage(hello=wpb.Hello(replica_id=0, secret="s3cret", num_ranks=1)))
        first = link.recv(10)
        assert first[0].WhichOneof("kind") == "welcome" and 0 in pool.replicas
        link.close()
        monkeypatch.setenv("HPCSERVE_WORKER_TLS_CA", certs["other"][0].read_text())
        with pytest.raises(LinkLost, match="over TLS"):
            LeaderLink(server.address, timeout=2)
        monkeypatch.delenv("HPCSERVE_WORKER_TLS_CA")
        with pytest.raises(LinkLost, match="cannot reach the daemon"):
            LeaderLink(server.address, timeout=2)  # plaintext against the TLS port
    finally:
        server.stop()


def _engine_fields(model_dir) -> dict:
    from hpcserve.engine.core import EngineConfig

    return asdict(EngineConfig(model=str(model_dir), num_threads=1, num_kv_blocks=64, max_model_len=256))


@pytest.mark.slow
def test_worker_ranks_dial_over_tls(tls, tiny_model_factory, tmp_path):
    """A real launch (mpiexec -n 1 hpcserve worker) gets the certificate's PEM text in its
    environment and its leader connects over TLS."""
    from hpcserve.daemon.workers import launcher_command

    pool = _pool(tmp_path, tls_ca_pem=tls.cert_pem.decode())
    pool.launcher = launcher_command(1, str(Path(sys.executable).parent / "mpiexec"))
    pool.engine_fields = _engine_fields(tiny_model_factory("llama"))
    server = _serve_pool(pool, tls)
    try:
        pool.link_address = server.address

        async def launch_until_ready():
            task = asyncio.create_task(pool.run())
            try:
                while not pool.is_ready and not task.done():
                    await asyncio.sleep(0.1)
                return pool.is_ready, {rid: r.hello.secret == pool._secret for rid, r in pool.replicas.items()}
            finally:
                await pool.stop(timeout_s=30)
                await asyncio.gather(task, return_exceptions=True)

        ready, replicas = server.call(launch_until_ready(), timeout=300)
        log = (tmp_path / "logs" / "workers.log").read_text(errors="replace")
        assert ready, log
        assert replicas == {0: True} and pool.router.events[0] == "ready"
    finally:
        server.stop()

"""The worker secret against the real daemon (``hpcserve serve``, 1 rank under the venv's mpiexec,
a tiny random model): a WorkerLink Hello with a wrong secret is refused with PERMISSION_DENIED,
a real ``hpcserve worker`` launched with a wrong secret exits non-zero saying so, and the daemon
keeps serving with its own replica only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
from daemon_harness import Daemon, reap_all

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import worker_pb2 as wpb
from hpcserve.api.v1 import worker_pb2_grpc
from hpcserve.daemon.workers import worker_command

pytestmark = pytest.mark.slow


def _engine_fields(model_dir) -> dict:
    from hpcserve.engine.core import EngineConfig

    return asdict(EngineConfig(model=str(model_dir), num_threads=1, num_kv_blocks=64, max_model_len=256))


def test_worker_with_wrong_secret_is_refused(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    daemon = Daemon(tmp_path / "state", model, ranks=1).start()
    try:
        before = daemon.info()
        assert [r.replica_id for r in before.replicas] == [0]

        # a hand-made Hello with a wrong secret, for a free and for a taken replica id
        with grpc.insecure_channel(daemon.address) as ch:
            stub = worker_pb2_grpc.WorkerLinkStub(ch)
            for replica_id in (0, 1):
                hello = wpb.WorkerMessage(hello=wpb.Hello(replica_id=replica_id, secret="not-the-secret",
                                                          num_ranks=1, hostname="intruder", pid=1))
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Connect(iter([hello]), timeout=30))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "secret" in info.value.details()

        # a real worker rank, launched as the daemon does but with a wrong secret
        env = {**os.environ, "HPCSERVE_WORKER_DAEMON": daemon.address, "HPCSERVE_WORKER_SECRET": "0" * 32,
               "HPCSERVE_WORKER_CONFIG": json.dumps(_engine_fields(model)), "HPCSERVE_LOG_LEVEL": "INFO"}
        for k in ("HPCSERVE_WORKER_DISAGG", "HPCSERVE_WORKER_TLS_CA"):
            env.pop(k, None)
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        proc = subprocess.run([mpiexec, "-n", "1", *worker_command()], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode != 0, proc.stderr
        assert "wrong or stale worker secret" in proc.stderr, proc.stderr

        # the daemon kept serving with its own replica only
        chunks = list(daemon.chat("still there?", max_tokens=4))
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) >= 1
        after = daemon.info()
        assert after.is_ready and [r.replica_id for r in after.replicas] == [0]
        assert after.num_worker_restarts == before.num_worker_restarts
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        reap_all()


def _hello(secret: str | None, replica_id: int = 0) -> wpb.WorkerMessage:
    hello = wpb.Hello(replica_id=replica_id, num_ranks=1, hostname="intruder", pid=1)
    if secret is not None:
        hello.secret = secret
    return wpb.WorkerMessage(hello=hello)


def test_empty_secret_is_refused_before_the_first_launch(tmp_path):
    """Before its first launch the pool's own secret is empty too: an empty (or absent) secret must
    still be refused, never compared equal."""
    import asyncio

    from hpcserve.daemon.workers import WorkerPool

    async def main() -> list[grpc.StatusCode]:
        pool = WorkerPool(num_ranks=1, launcher=["false"], engine_fields={}, link_address="", log_dir=tmp_path,
                          restart_limit=0, start_timeout_s=1.0, router=None)
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerLinkServicer_to_server(pool, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = worker_pb2_grpc.WorkerLinkStub(ch)
                for secret in ("", None):
                    call = stub.Connect(iter([_hello(secret)]), timeout=30)
                    try:
                        async for _ in call:
                            pass
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
        finally:
            await server.stop(None)
        assert not pool.replicas  # nothing was registered
        return codes

    assert asyncio.run(main()) == [grpc.StatusCode.PERMISSION_DENIED] * 2


def test_empty_secret_is_refused_by_a_serving_daemon(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    daemon = Daemon(tmp_path / "state", model, ranks=1).start()
    try:
        with grpc.insecure_channel(daemon.address) as ch:
            stub = worker_pb2_grpc.WorkerLinkStub(ch)
            for secret in ("", None):
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Connect(iter([_hello(secret, replica_id=1)]), timeout=30))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert daemon.info().is_ready
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        reap_all()

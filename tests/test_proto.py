"""The gRPC API definition: generated code is fresh, services work over a real grpc.aio
server on 127.0.0.1:0, enums follow the *_UNSPECIFIED = 0 convention. No torch."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from hpcserve.api.v1 import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto" / "hpcserve" / "api" / "v1"
GEN_DIR = ROOT / "hpcserve" / "api" / "v1"
GEN_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


# (a) committed generated code == freshly generated code ---------------------------------
def test_generated_code_is_fresh(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    assert [Path(p).name for p in protos] == ["serving.proto", "worker.proto"]
    out = str(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    fresh_dir = tmp_path / "hpcserve" / "api" / "v1"
    fresh = sorted(p.name for p in fresh_dir.iterdir())
    committed = sorted(p.name for p in GEN_DIR.iterdir() if p.name.endswith(GEN_SUFFIXES))
    assert committed == fresh
    stale = [n for n in fresh if (fresh_dir / n).read_bytes() != (GEN_DIR / n).read_bytes()]
    assert not stale, f"stale generated code {stale}: run scripts/gen_proto.sh and commit"


# (b) a real grpc.aio server and client ----------------------------------------------------
class _TinyServing(serving_pb2_grpc.ServingServicer):
    """Test-only servicer: Chat streams three chunks; GetServerInfo answers; the rest is
    inherited (UNIMPLEMENTED)."""

    async def Chat(self, request, context):
        req_id = request.request_id if request.HasField("request_id") else "chat-1"
        for i, word in enumerate(["Hel", "lo", "!"]):
            chunk = serving_pb2.ChatChunk(request_id=req_id, text=word, token_ids=[100 + i])
            if i == 2:
                chunk.finish_reason = serving_pb2.FINISH_REASON_STOP
                chunk.usage.CopyFrom(serving_pb2.Usage(
                    prompt_tokens=len(request.messages[-1].content), completion_tokens=3,
                    total_tokens=len(request.messages[-1].content) + 3, cached_tokens=0))
            yield chunk

    async def GetServerInfo(self, request, context):
        return serving_pb2.ServerInfo(
            version="0.1.0", model="demo", num_ranks=2, uptime_s=1.5,
            replicas=[serving_pb2.ReplicaInfo(
                replica_id=0, role=serving_pb2.REPLICA_ROLE_MIXED, ranks=[0, 1],
                num_free_kv_blocks=10, num_kv_blocks=16)],
        )


class _TinyWorkerLink(worker_pb2_grpc.WorkerLinkServicer):
    async def Connect(self, request_iterator, context):
        async for msg in request_iterator:
            if msg.WhichOneof("kind") == "hello":
                yield worker_pb2.DaemonMessage(welcome=worker_pb2.Welcome(
                    replica_id=msg.hello.replica_id, config_json="{}"))
                yield worker_pb2.DaemonMessage(add_request=worker_pb2.AddRequest(
                    request_id="r1", prompt_token_ids=[1, 2, 3],
                    sampling_params=serving_pb2.SamplingParams(max_tokens=4, temperature=0.0),
                    request_class=serving_pb2.REQUEST_CLASS_BATCH, eos_token_ids=[2]))
            elif msg.WhichOneof("kind") == "step_outputs":
                yield worker_pb2.DaemonMessage(shutdown=worker_pb2.Shutdown(drain=True))
                return


async def _with_server(body):
    server = grpc.aio.server()
    serving_pb2_grpc.add_ServingServicer_to_server(_TinyServing(), server)
    worker_pb2_grpc.add_WorkerLinkServicer_to_server(_TinyWorkerLink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(body(channel), timeout=30)
    finally:
        await server.stop(grace=None)


def test_chat_streams_chunks_over_real_server():
    async def body(channel):
        stub = serving_pb2_grpc.ServingStub(channel)
        req = serving_pb2.ChatRequest(
            messages=[serving_pb2.ChatMessage(role="user", content="Hi")],
            sampling_params=serving_pb2.SamplingParams(max_tokens=8),
            request_id="q1", request_class=serving_pb2.REQUEST_CLASS_INTERACTIVE)
        chunks = [c async for c in stub.Chat(req)]
        assert [c.text for c in chunks] == ["Hel", "lo", "!"]
        assert all(c.request_id == "q1" for c in chunks)
        assert [c.finish_reason for c in chunks[:-1]] == [serving_pb2.FINISH_REASON_UNSPECIFIED] * 2
        assert not chunks[0].HasField("usage")
        last = chunks[-1]
        assert last.finish_reason == serving_pb2.FINISH_REASON_STOP
        assert last.HasField("usage")
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2, 3, 5)

        info = await stub.GetServerInfo(serving_pb2.GetServerInfoRequest())
        assert (info.model, info.num_ranks) == ("demo", 2)
        assert info.replicas[0].role == serving_pb2.REPLICA_ROLE_MIXED
        assert list(info.replicas[0].ranks) == [0, 1]
        assert not info.HasField("allocation")  # not under Slurm

    asyncio.run(_with_server(body))


def test_unimplemented_methods_return_unimplemented():
    async def body(channel):
        stub = serving_pb2_grpc.ServingStub(channel)
        calls = [
            lambda: stub.Abort(serving_pb2.AbortRequest(request_id="x")),
            lambda: stub.GetBatch(serving_pb2.GetBatchRequest(batch_id="b")),
            lambda: stub.SubmitBatch(serving_pb2.SubmitBatchRequest(input_path="/tmp/in.jsonl")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        for stream in (
            stub.Complete(serving_pb2.CompletionRequest(prompt_text="a")),
            stub.StreamBatchResults(serving_pb2.StreamBatchResultsRequest(batch_id="b")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [_ async for _ in stream]
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(_with_server(body))


def test_worker_link_bidi_stream():
    async def body(channel):
        stub = worker_pb2_grpc.WorkerLinkStub(channel)
        call = stub.Connect()
        await call.write(worker_pb2.WorkerMessage(hello=worker_pb2.Hello(
            rank=0, replica_id=1, role=serving_pb2.REPLICA_ROLE_DECODE, world_size=2,
            secret="s", hostname="node1", pid=123)))
        welcome = await call.read()
        assert welcome.WhichOneof("kind") == "welcome" and welcome.welcome.replica_id == 1
        add = (await call.read()).add_request
        assert list(add.prompt_token_ids) == [1, 2, 3]
        assert add.sampling_params.HasField("temperature") and add.sampling_params.temperature == 0.0
        assert not add.sampling_params.HasField("seed")
        await call.write(worker_pb2.WorkerMessage(step_outputs=worker_pb2.StepOutputs(outputs=[
            worker_pb2.RequestStepOutput(request_id="r1", new_token_ids=[7], is_finished=True,
                                         finish_reason=serving_pb2.FINISH_REASON_LENGTH)])))
        shutdown = await call.read()
        assert shutdown.WhichOneof("kind") == "shutdown" and shutdown.shutdown.drain
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF

    asyncio.run(_with_server(body))


# (c) conventions --------------------------------------------------------------------------
def _all_enums(file_desc):
    yield from file_desc.enum_types_by_name.values()
    stack = list(file_desc.message_types_by_name.values())
    while stack:
        msg = stack.pop()
        yield from msg.enum_types
        stack.extend(msg.nested_types)


@pytest.mark.parametrize("module", [serving_pb2, worker_pb2], ids=["serving", "worker"])
def test_enums_start_with_unspecified_zero(module):
    enums = list(_all_enums(module.DESCRIPTOR))
    if module is serving_pb2:
        assert {e.name for e in enums} >= {"RequestClass", "FinishReason", "ReplicaRole", "BatchStatus"}
    for enum in enums:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        assert enum.values_by_number[0].name == prefix + "UNSPECIFIED", enum.full_name
        assert all(v.name.startswith(prefix) for v in enum.values), enum.full_name


def test_batch_status_mirrors_openai():
    openai = ["validating", "in_progress", "finalizing", "completed", "failed",
              "cancelling", "cancelled", "expired"]
    names = {v.name for v in serving_pb2.BatchStatus.DESCRIPTOR.values}
    assert names == {"BATCH_STATUS_UNSPECIFIED"} | {"BATCH_STATUS_" + s.upper() for s in openai}


def test_sampling_params_match_engine():
    from hpcserve.engine.request import SamplingParams

    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    proto_fields = set(serving_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    assert proto_fields == engine_fields
    # Scalars whose absence matters track presence, so the server can apply defaults.
    msg = serving_pb2.SamplingParams()
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs"):
        assert not msg.HasField(name), name
    msg.temperature = 0.0
    assert msg.HasField("temperature")

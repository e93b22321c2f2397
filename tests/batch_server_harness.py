"""Test harness: a real grpc.aio server on 127.0.0.1:0 in a background thread (own event
loop) serving ``FakeServing``, which delegates the batch RPCs to ``BatchApi`` over a real
``BatchStore`` and answers Chat/Abort/GetServerInfo with scripted replies; behind the
``TenantAuthInterceptor`` (one admin tenant, ``default``, whose key is ``token``) when a token is given, with gRPC health and a minimal WorkerLink.
No torch. ``fake_output(claimed, p, c)`` builds an output line with usage; ``answer_lines``
plays the daemon's scheduler (claim + record) from a thread.

Chat script (by the last message's content): "break" sends one chunk, then UNAVAILABLE;
"slow" sends a chunk every 0.1 s until aborted or cancelled; "long"/"fail" end with
LENGTH/ERROR; anything else answers "echo <number of messages>: <content>" word by word.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from hpcserve.api.auth import TenantAuthInterceptor
from hpcserve.api.batch_api import BatchApi
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc, worker_pb2, worker_pb2_grpc


class FakeServing(serving_pb2_grpc.ServingServicer):
    def __init__(self, api: BatchApi):
        self.api = api
        self.chats: list[pb.ChatRequest] = []
        self.aborted: list[str] = []
        self.info = pb.ServerInfo(
            version="0.1.0", model="tiny-model", num_ranks=2, uptime_s=75.0, is_ready=True, max_model_len=2048,
            num_worker_restarts=1, state_dir="/state",
            replicas=[pb.ReplicaInfo(replica_id=0, role=pb.REPLICA_ROLE_MIXED, ranks=[0, 1], num_running=3,
                                     num_waiting=1, num_free_kv_blocks=100, num_kv_blocks=128,
                                     recent_step_time_s=0.045)],
            allocation=pb.Allocation(job_id="4242", nodes=["n1", "n2"], end_time=int(time.time()) + 3600,
                                     seconds_left=3600))

    async def SubmitBatch(self, request, context):
        return await self.api.SubmitBatch(request, context)

    async def GetBatch(self, request, context):
        return await self.api.GetBatch(request, context)

    async def ListBatches(self, request, context):
        return await self.api.ListBatches(request, context)

    async def CancelBatch(self, request, context):
        return await self.api.CancelBatch(request, context)

    async def StreamBatchResults(self, request, context):
        async for line in self.api.StreamBatchResults(request, context):
            yield line

    async def GetServerInfo(self, request, context):
        return self.info

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return pb.AbortResponse(is_aborted=True)

    async def Chat(self, request, context):
        self.chats.append(request)
        rid = request.request_id if request.HasField("request_id") else "chat-x"
        last = request.messages[-1].content
        if last == "break":
            yield pb.ChatChunk(request_id=rid, text="partial")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "workers died: relaunching them; retry shortly")
        if last == "slow":
            for _ in range(200):
                if rid in self.aborted:
                    yield pb.ChatChunk(request_id=rid, finish_reason=pb.FINISH_REASON_ABORT)
                    return
                yield pb.ChatChunk(request_id=rid, text="tick ")
                await asyncio.sleep(0.1)
            return
        words = f"echo {len(request.messages)}: {last}".split(" ")
        finish = {"long": pb.FINISH_REASON_LENGTH, "fail": pb.FINISH_REASON_ERROR}.get(last, pb.FINISH_REASON_STOP)
        for i, w in enumerate(words):
            chunk = pb.ChatChunk(request_id=rid, text=w if i == 0 else " " + w)
            if i == len(words) - 1:
                chunk.finish_reason = finish
                chunk.usage.CopyFrom(pb.Usage(prompt_tokens=5, completion_tokens=len(words), total_tokens=5 + len(words)))
            yield chunk


class _WorkerLink(worker_pb2_grpc.WorkerLinkServicer):
    async def Connect(self, request_iterator, context):
        async for msg in request_iterator:
            yield worker_pb2.DaemonMessage(welcome=worker_pb2.Welcome(replica_id=msg.hello.replica_id))
            return


class ServerThread:
    """``ServerThread(servicer, token=None)``: started on construction; ``address``; ``stop()``."""

    def __init__(self, servicer: FakeServing, token: str | None = None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(servicer, token), self.loop).result(10)
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self, servicer: FakeServing, token: str | None) -> int:
        interceptors = []
        if token:
            from hpcserve.config_tables import TenantSection
            from hpcserve.daemon.tenants import Tenants

            tenants = Tenants({"default": TenantSection(admin=True)}, None)
            tenants.mint_key("default", token)
            interceptors.append(TenantAuthInterceptor(tenants))
        self.server = grpc.aio.server(interceptors=interceptors)
        serving_pb2_grpc.add_ServingServicer_to_server(servicer, self.server)
        worker_pb2_grpc.add_WorkerLinkServicer_to_server(_WorkerLink(), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def fake_output(c, prompt_tokens: int = 3, completion_tokens: int = 7) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {"id": f"batch_req_{c.line_no}", "custom_id": c.custom_id, "error": None,
            "response": {"status_code": 200, "request_id": f"req_{c.line_no}",
                         "body": {"object": "chat.completion", "line": c.line_no, "usage": usage}}}


def answer_lines(store, batch_id: str, delay: float = 0.05, stop: threading.Event | None = None) -> threading.Thread:
    """A thread that claims the batch's lines one by one and records an output line for each."""

    def run() -> None:
        while stop is None or not stop.is_set():
            claimed = store.claim_lines(1, batch_id=batch_id)
            if not claimed:
                if store.get_batch(batch_id)["status"] not in ("in_progress", "validating"):
                    return
                time.sleep(delay)
                continue
            time.sleep(delay)
            store.record_result(batch_id, claimed[0].line_no, fake_output(claimed[0]), False)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t

"""hpcserve.api.batch_api.BatchApi and hpcserve.api.auth.TokenAuthInterceptor over a real
grpc.aio server (127.0.0.1:0, background thread) and a real BatchStore. No torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from batch_server_harness import FakeServing, ServerThread, answer_lines, fake_output
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hpcserve.api.auth import bearer_token
from hpcserve.api.batch_api import BatchApi, batch_from_proto, batch_to_proto
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from hpcserve.batch.openai_format import build_error_line
from hpcserve.daemon.batch_policy import BatchPolicy
from hpcserve.daemon.batches import BatchStore

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CHAT = "/v1/chat/completions"
BATCH_KEYS = {"id", "object", "endpoint", "errors", "input_file", "completion_window", "status", "output_file",
              "error_file", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage"}


def req(cid: str, url: str = CHAT) -> str:
    body = {"messages": [{"role": "user", "content": f"hi {cid}"}]} if url == CHAT else {"prompt": "x"}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def env(tmp_path):
    store = BatchStore(tmp_path / "state")
    api = BatchApi(store, BatchPolicy(("1h", "2h", "24h")))
    api.poll_interval_s = 0.05
    servicer = FakeServing(api)
    server = ServerThread(servicer, token=TOKEN)
    channel = grpc.insecure_channel(server.address)
    stub = serving_pb2_grpc.ServingStub(channel)
    yield store, stub, channel
    channel.close()
    server.stop()
    store.close()


def call(stub_method, request, metadata=AUTH):
    return stub_method(request, metadata=metadata, timeout=10)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        out = fn(*args, **kw)
        if hasattr(out, "__iter__") and not isinstance(out, (pb.Batch, pb.ListBatchesResponse)):
            list(out)
    return err.value


def test_submit_get_list_cancel(env, tmp_path):
    store, stub, _ = env
    inline = call(stub.SubmitBatch, pb.SubmitBatchRequest(input_jsonl=jsonl(req("a"), req("b"), "{bad"),
                                                          metadata={"project": "x"}, completion_window="2h"))
    assert inline.status == pb.BATCH_STATUS_IN_PROGRESS and inline.id.startswith("batch_")
    assert (inline.request_counts.total, inline.request_counts.failed) == (3, 1)
    assert inline.endpoint == CHAT and inline.completion_window == "2h" and dict(inline.metadata) == {"project": "x"}
    assert inline.expires_at == inline.created_at + 7200 and inline.input_file.endswith("/input.jsonl")
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(req("c")))
    by_path = call(stub.SubmitBatch, pb.SubmitBatchRequest(input_path=str(path)))
    assert by_path.input_file == str(path) and by_path.completion_window == "24h"
    third = call(stub.SubmitBatch, pb.SubmitBatchRequest(input_jsonl=jsonl(req("d")), endpoint=CHAT))

    got = batch_from_proto(call(stub.GetBatch, pb.GetBatchRequest(batch_id=inline.id)))
    assert set(got) == BATCH_KEYS and got == batch_from_proto(inline)
    assert got["object"] == "batch" and got["completed_at"] is None and got["output_file"] is None
    assert got["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}

    page = call(stub.ListBatches, pb.ListBatchesRequest(limit=2))
    assert [b.id for b in page.batches] == [third.id, by_path.id] and page.has_more
    page2 = call(stub.ListBatches, pb.ListBatchesRequest(limit=2, after=by_path.id))
    assert [b.id for b in page2.batches] == [inline.id] and not page2.has_more
    assert len(call(stub.ListBatches, pb.ListBatchesRequest()).batches) == 3

    (c,) = store.claim_lines(1, batch_id=inline.id)
    cancelling = call(stub.CancelBatch, pb.CancelBatchRequest(batch_id=inline.id))
    assert cancelling.status == pb.BATCH_STATUS_CANCELLING and cancelling.cancelling_at > 0
    store.record_result(inline.id, c.line_no, fake_output(c, 4, 9), False)
    done = call(stub.GetBatch, pb.GetBatchRequest(batch_id=inline.id))
    assert done.status == pb.BATCH_STATUS_CANCELLED and done.output_file and done.error_file
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (4, 9, 13)
    cancelled = call(stub.CancelBatch, pb.CancelBatchRequest(batch_id=by_path.id))
    assert cancelled.status == pb.BATCH_STATUS_CANCELLED  # nothing running: cancelled at once


def test_errors_are_clear_statuses(env, tmp_path, monkeypatch):
    store, stub, _ = env
    for err in (rpc_error(call, stub.GetBatch, pb.GetBatchRequest(batch_id="batch_nope")),
                rpc_error(call, stub.CancelBatch, pb.CancelBatchRequest(batch_id="batch_nope")),
                rpc_error(call, stub.StreamBatchResults, pb.StreamBatchResultsRequest(batch_id="batch_nope"))):
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details().startswith("batch_id: no batch with id 'batch_nope'") and "hpcserve status" in err.details()
    err = rpc_error(call, stub.ListBatches, pb.ListBatchesRequest(after="batch_nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("after:")

    missing = tmp_path / "missing.jsonl"
    cases = [
        (pb.SubmitBatchRequest(input_jsonl=jsonl(req("a")), completion_window="soon"), "completion_window: must be one of '1h', '2h', '24h'"),
        (pb.SubmitBatchRequest(input_path=str(missing)),
         (f"input_path: {missing} does not exist or is not readable by the daemon; pass the file's content instead "
          "(hpcserve submit sends it inline)")),
        (pb.SubmitBatchRequest(input_path=str(tmp_path)), "input_path: "),  # a directory
        (pb.SubmitBatchRequest(input_path="rel/in.jsonl"), "input_path: 'rel/in.jsonl' is relative"),
        (pb.SubmitBatchRequest(input_jsonl=jsonl(req("a")), endpoint="/v1/embeddings"), "endpoint: must be"),
        (pb.SubmitBatchRequest(input_jsonl=jsonl(req("a")), metadata={f"k{i}": "v" for i in range(17)}),
         "metadata: at most 16"),
        (pb.SubmitBatchRequest(input_jsonl=jsonl(req("a")), metadata={"k": "v" * 513}), "metadata: the value of 'k'"),
        (pb.SubmitBatchRequest(), "input: set input_jsonl"),
    ]
    for request, want in cases:
        err = rpc_error(call, stub.SubmitBatch, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.details())
        assert err.details().startswith(want), err.details()
    assert store.list_batches() == []  # nothing was stored
    for fn, request in ((stub.GetBatch, pb.GetBatchRequest()), (stub.CancelBatch, pb.CancelBatchRequest()),
                        (stub.ListBatches, pb.ListBatchesRequest(limit=1000))):
        assert rpc_error(call, fn, request).code() == grpc.StatusCode.INVALID_ARGUMENT

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "get_batch", boom)
    err = rpc_error(call, stub.GetBatch, pb.GetBatchRequest(batch_id="batch_x"))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: disk on fire" in err.details() and "Traceback" not in err.details()


def test_stream_results_without_and_with_follow(env):
    store, stub, _ = env
    b = call(stub.SubmitBatch, pb.SubmitBatchRequest(input_jsonl=jsonl(*[req(f"r{i}") for i in range(5)], "{x")))
    c = store.claim_lines(2, batch_id=b.id)
    store.record_result(b.id, c[1].line_no, fake_output(c[1]), False)
    store.record_result(b.id, c[0].line_no, build_error_line("r0", 1, "context_length_exceeded", "long"), True)
    lines = list(call(stub.StreamBatchResults, pb.StreamBatchResultsRequest(batch_id=b.id)))
    # the files' order: output lines, then error lines, each by input line
    assert [(x.custom_id, x.is_error) for x in lines] == [("r1", False), ("r0", True), ("", True)]
    assert json.loads(lines[0].json)["response"]["body"]["line"] == 2

    got: list = []
    follower = threading.Thread(target=lambda: got.extend(
        call(stub.StreamBatchResults, pb.StreamBatchResultsRequest(batch_id=b.id, follow=True))))
    follower.start()
    answer_lines(store, b.id, delay=0.05).join(10)
    follower.join(10)
    assert not follower.is_alive()
    # stored order: the validation error first, then as answered; each line exactly once
    assert [x.custom_id for x in got] == ["", "r1", "r0", "r2", "r3", "r4"]
    final = call(stub.GetBatch, pb.GetBatchRequest(batch_id=b.id))
    assert final.status == pb.BATCH_STATUS_COMPLETED and final.usage.output_tokens == 4 * 7
    # follow on a finished batch sends everything once and ends
    assert len(list(call(stub.StreamBatchResults, pb.StreamBatchResultsRequest(batch_id=b.id, follow=True)))) == 6


def test_token_auth(env):
    _, stub, channel = env
    request = pb.ListBatchesRequest()
    for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        err = rpc_error(call, stub.ListBatches, request, metadata=md)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "key" in err.details()
        assert TOKEN not in err.details()
    err = rpc_error(call, stub.StreamBatchResults, pb.StreamBatchResultsRequest(batch_id="b"), metadata=())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(call, stub.Chat, pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")]), metadata=())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(stub.ListBatches, request, metadata=(("authorization", f"bearer  {TOKEN} "),)).batches == []
    assert call(stub.GetServerInfo, pb.GetServerInfoRequest()).model == "tiny-model"
    # other services pass through without a token
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    link = worker_pb2_grpc.WorkerLinkStub(channel).Connect(
        iter([worker_pb2.WorkerMessage(hello=worker_pb2.Hello(replica_id=3))]), timeout=10)
    assert next(link).welcome.replica_id == 3
    link.cancel()


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("Authorization", b"bearer xyz")]) == "xyz"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_proto_round_trip(tmp_path):
    store = BatchStore(tmp_path / "s")
    try:
        b = store.create_batch(jsonl("{bad", "[1]"), metadata={"a": "b"})
        # tenant and the file ids (the /v1/files view) are not part of serving_pb2.Batch
        d = {k: v for k, v in store.get_batch(b["id"]).items()
             if k not in ("tenant", "input_file_id", "output_file_id", "error_file_id")}
        pb_batch = batch_to_proto(d)
        assert pb_batch.status == pb.BATCH_STATUS_FAILED and [e.line for e in pb_batch.errors] == [1, 2]
        assert batch_from_proto(pb_batch) == d
    finally:
        store.close()


def test_client_side_modules_do_not_import_torch():
    code = ("import sys, hpcserve.api.batch_api, hpcserve.api.auth, hpcserve.api.client, hpcserve.commands.jobs, "
            "hpcserve.commands.chat; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)

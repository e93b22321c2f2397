"""Per-tenant usage end to end inside one process.

- worker side: a real ``LLMEngine`` (tiny random model) under ``ReplicaLoop``; every step it runs
  reports its wall time and each scheduled request's token share, also the steps that stream
  nothing (prefill chunks) and prefill-only steps of a disaggregated prefill engine;
- daemon side: the real ``Router`` with a real ``Frontend``, a real ``BatchStore`` (SQLite) and
  real ``workers.Replica`` objects, fed fabricated ``StepOutputs`` (the replicas' side of the
  link): GPU-seconds per tenant by token share x the replica's ranks, and every request counted
  exactly once: chat, aborted chat, batch, requeued batch line, error line, worker loss and a
  disaggregated (prefill → decode) chat and batch line; useful seconds (docs/utilization.md)
  credited per tenant and class as steps arrive, debited for batch lines requeued, aborted, lost or
  given an error line and for the prefill side of a failed KV handoff, kept for chats.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from daemon_harness import chat_line

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import worker_pb2 as wpb
from hpcserve.daemon.batches import BatchStore
from hpcserve.daemon.router import Router
from hpcserve.daemon.usage import UNATTRIBUTED, utc_day
from hpcserve.daemon.workers import Replica
from hpcserve.engine.request import SamplingParams

CHAT = pb.REQUEST_CLASS_INTERACTIVE


# ---------------------------------------------------------------------------- worker side
class ScriptedLink:
    """The replica's end of the worker link: hands the loop one scripted batch of daemon messages
    per ``recv`` and keeps everything the loop sends."""

    def __init__(self, script: list[list]) -> None:
        self.script = list(script)
        self.sent: list = []

    def recv(self, timeout):
        return self.script.pop(0) if self.script else []

    def send(self, msg) -> None:
        self.sent.append(msg)


def _engine(model_dir, **cfg):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=128, max_num_seqs=8,
                                  max_model_len=128, max_num_batched_tokens=8, enable_prefix_caching=False, **cfg))


def test_worker_reports_every_step_time_and_token_shares(tiny_model_factory):
    from hpcserve.api.convert import sampling_to_proto
    from hpcserve.cluster.worker import ReplicaLoop

    eng = _engine(tiny_model_factory("llama"))
    prompts = {"a": list(range(3, 23)), "b": list(range(40, 45))}  # "a" needs 3 prefill chunks of <= 8 tokens
    adds = [wpb.DaemonMessage(add_request=wpb.AddRequest(
        request_id=rid, prompt_token_ids=ids, request_class=CHAT,
        sampling_params=sampling_to_proto(SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))))
        for rid, ids in prompts.items()]
    link = ScriptedLink([adds, [wpb.DaemonMessage(shutdown=wpb.Shutdown(drain=True))]])
    loop = ReplicaLoop(eng, link)
    loop.run()

    steps = [m.step_outputs for m in link.sent if m.WhichOneof("kind") == "step_outputs"]
    stepped = [s for s in steps if s.shares]
    assert len(stepped) == loop.num_steps  # one message per step that ran
    assert all(s.step_time_s > 0 for s in stepped)
    assert any(not s.outputs for s in stepped)  # a prefill chunk streams nothing but is still reported
    assert sum(s.step_time_s for s in stepped) == pytest.approx(loop.busy_time_s)
    tokens = {rid: [t for s in steps for o in s.outputs if o.request_id == rid for t in o.new_token_ids]
              for rid in prompts}
    computed = {rid: sum(sh.num_tokens for s in stepped for sh in s.shares if sh.request_id == rid) for rid in prompts}
    # each prompt token once, then one per decode (the last sampled token is never fed back)
    assert computed == {rid: len(prompts[rid]) + len(tokens[rid]) - 1 for rid in prompts}
    assert all(len(t) == 4 for t in tokens.values())
    assert all(sh.num_tokens <= 8 for s in stepped for sh in s.shares)
    # useful-work credit: positive, never more than the step's time (engine/useful_work.py)
    assert all(0 < sum(sh.useful_s for sh in s.shares) <= s.step_time_s for s in stepped)


def test_prefill_only_steps_have_shares(tiny_model_factory):
    from hpcserve.transfer.loopback import LoopbackChannel, LoopbackConnector

    eng = _engine(tiny_model_factory("llama"))
    eng.attach_handoff(LoopbackConnector(LoopbackChannel(), 0, timeout_s=5.0), rank=0)
    prompt = list(range(5, 24))
    eng.add_request("p", prompt, SamplingParams(max_tokens=8), prefill_only=True)
    shares, outputs = [], []
    while eng.has_unfinished_requests():
        outputs += eng.step()
        shares += eng.last_step_shares
    assert outputs == [] and eng.handoff.is_held("p")
    assert {sh.req_id for sh in shares} == {"p"} and sum(sh.num_tokens for sh in shares) == len(prompt)
    assert len(shares) == -(-len(prompt) // 8)
    assert all(sh.useful_s > 0 for sh in shares)  # a prefill replica's work earns credit too


# ---------------------------------------------------------------------------- daemon side
@pytest.fixture
def frontend(tiny_model_factory):
    from hpcserve.engine.frontend import Frontend
    from hpcserve.models.config import load_model_config

    model_dir = tiny_model_factory("llama")
    return Frontend.load(model_dir, load_model_config(model_dir), 512, "tiny")


def _replica(i: int, role=pb.REPLICA_ROLE_MIXED, num_ranks: int = 1) -> Replica:
    return Replica(replica_id=i, launch_id=1, hello=wpb.Hello(
        rank=i, replica_id=i, role=role, max_model_len=512, num_kv_blocks=256, block_size=16, num_ranks=num_ranks))


def _router(frontend, store, *replicas) -> Router:
    r = Router(frontend, store, "tiny", batch_watermark=4)
    r.pool = SimpleNamespace(replicas={rep.replica_id: rep for rep in replicas})
    r.on_ready()
    return r


def _sent(rep: Replica) -> list:
    msgs = []
    while not rep.outbox.empty():
        msgs.append(rep.outbox.get_nowait())
    return msgs


def _added(*reps) -> dict:
    """request_id -> (replica, AddRequest) of every AddRequest waiting in the replicas' outboxes."""
    return {m.add_request.request_id: (rep, m.add_request) for rep in reps for m in _sent(rep)
            if m.WhichOneof("kind") == "add_request"}


def _out(rid: str, tokens=(), finish: int = 0, **kw) -> wpb.RequestStepOutput:
    return wpb.RequestStepOutput(request_id=rid, new_token_ids=list(tokens), new_text="x" * len(tokens),
                                 is_finished=bool(finish), finish_reason=finish, **kw)


class Steps:
    """Sends fabricated engine steps to the router and keeps the GPU-seconds each tenant should
    get: the step's time x the replica's ranks, split by token share."""

    def __init__(self, router: Router, tenant_of: dict) -> None:
        self.router, self.tenant_of = router, tenant_of
        self.expected: dict[str, float] = {}
        self.total = 0.0

    def step(self, rep: Replica, time_s: float, shares: list[tuple[str, int]], outputs=()) -> None:
        gpu = time_s * rep.hello.num_ranks
        self.total += gpu
        n = sum(k for _, k in shares)
        for rid, k in shares or [(None, 1)]:  # a step that computed no token: unattributed
            tenant = self.tenant_of.get(rid, UNATTRIBUTED)
            self.expected[tenant] = self.expected.get(tenant, 0.0) + gpu * k / (n or 1)
        self.router.on_outputs(rep, wpb.StepOutputs(
            step_time_s=time_s, shares=[wpb.StepShare(request_id=r, num_tokens=k) for r, k in shares],
            outputs=list(outputs)))

    def check(self, meter) -> None:
        snap = meter.snapshot()
        got = {t: row["gpu_seconds"] for t, row in snap.items() if row["gpu_seconds"]}
        assert got == pytest.approx(self.expected)
        assert sum(got.values()) == pytest.approx(self.total)


def _stream(inf) -> list:
    items = []
    while not inf.queue.empty():
        items.append(inf.queue.get_nowait())
    return items


def _counts(meter) -> dict:
    """tenant -> (requests, input tokens, output tokens) of the tenants with a counted request."""
    return {t: (row["requests"], row["input_tokens"], row["output_tokens"]) for t, row in meter.snapshot().items()
            if row["requests"]}


def test_router_meters_chat_batch_abort_requeue_and_errors(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        r0, r1 = _replica(0, num_ranks=2), _replica(1)
        router = _router(frontend, store, r0, r1)
        batch = store.create_batch("\n".join(chat_line(f"c{i}", f"line {i} " * (i + 1), max_tokens=4)
                                             for i in range(3)).encode(), tenant="carol")
        a = router.submit("chat-a", [5] * 7, SamplingParams(max_tokens=3), CHAT, tenant="alice")
        b = router.submit("chat-b", [6] * 3, SamplingParams(max_tokens=9), CHAT, tenant="bob")
        A, B = a.req_id, b.req_id  # the router's own ids (the replicas see these)
        await router._feed_once()
        added = _added(r0, r1)
        line_no = {rid: router.inflight[rid].line.line_no for rid in added if rid.startswith("batch-")}
        lines = sorted(line_no, key=line_no.get)
        assert len(lines) == 3 and {added[rid][1].request_class for rid in lines} == {pb.REQUEST_CLASS_BATCH}
        tenant_of = {A: "alice", B: "bob", **{rid: "carol" for rid in lines}}
        steps = Steps(router, tenant_of)
        plen = {rid: len(add.prompt_token_ids) for rid, (_, add) in added.items()}
        for rep in (r0, r1):  # one prefill step per replica (plus an id the router does not know)
            mine = [rid for rid, (where, _) in added.items() if where is rep]
            steps.step(rep, 0.3, [(rid, plen[rid]) for rid in mine] + [("stale-req", 2)],
                       [_out(rid, [11]) for rid in mine])
        where = {rid: rep for rid, (rep, _) in added.items()}
        l0, l1, l2 = lines
        # decodes: chat-a stops after 3 tokens; chat-b is aborted after 1; line 0 ends by length,
        # line 1 is aborted (checkpoint: requeued), line 2 is rejected with an error
        steps.step(where[A], 0.1, [(A, 1)], [_out(A, [12])])
        steps.step(where[A], 0.1, [(A, 1)], [_out(A, [13], pb.FINISH_REASON_STOP)])
        assert not router.abort_for("alice", "chat-b")  # another tenant's id: nothing happens
        assert router.abort_for("bob", "chat-b")
        steps.step(where[B], 0.05, [], [_out(B, [], pb.FINISH_REASON_ABORT)])
        steps.step(where[l0], 0.2, [(l0, 1)], [_out(l0, [7, 8, 9], pb.FINISH_REASON_LENGTH)])
        steps.step(where[l1], 0.1, [(l1, 1)], [_out(l1, [7], pb.FINISH_REASON_ABORT)])
        steps.step(where[l2], 0.1, [], [_out(l2, [], pb.FINISH_REASON_ERROR, error_code="bad", error_message="x")])
        await router.flush_writes()
        assert _stream(a)[-1].is_finished and _stream(b)[-1].finish_reason == pb.FINISH_REASON_ABORT
        counts = _counts(router.meter)
        assert counts["alice"] == (1, 7, 3)
        assert counts["bob"] == (1, 3, 1)  # an aborted chat counts what its client got
        assert counts["carol"] == (1, plen[l0], 4)  # line 1 requeued, line 2 an error line: not counted

        await router._feed_once()  # line 1 runs again, under a new request id
        again = _added(r0, r1)
        assert len(again) == 1
        (l1b, (rep, add)), = again.items()
        assert router.inflight[l1b].line.line_no == line_no[l1] and l1b != l1
        steps.tenant_of[l1b] = "carol"
        steps.step(rep, 0.2, [(l1b, len(add.prompt_token_ids))], [_out(l1b, [1, 2, 3, 4], pb.FINISH_REASON_LENGTH)])
        await router.flush_writes()
        counts = _counts(router.meter)
        assert counts["carol"] == (2, plen[l0] + len(add.prompt_token_ids), 8)
        assert counts["alice"] == (1, 7, 3) and counts["bob"] == (1, 3, 1)
        steps.check(router.meter)
        assert steps.expected[UNATTRIBUTED] > 0
        info = store.get_batch(batch["id"])
        assert (info["request_counts"]["completed"], info["request_counts"]["failed"]) == (2, 1)
        deltas = router.meter.take_deltas()
        assert {day for _, day in deltas} == {utc_day()}
        assert deltas[("carol", utc_day())]["requests"] == 2
        store.close()

    asyncio.run(main())


def test_worker_loss_counts_the_chat_once_and_the_batch_line_after_its_rerun(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        rep = _replica(0)
        router = _router(frontend, store, rep)
        store.create_batch(chat_line("only", "hello", max_tokens=2).encode(), tenant="carol")
        chat = router.submit("chat", [4] * 6, SamplingParams(max_tokens=5), CHAT, tenant="alice").req_id
        await router._feed_once()
        added = _added(rep)
        line = next(rid for rid in added if rid.startswith("batch-"))
        steps = Steps(router, {chat: "alice", line: "carol"})
        steps.step(rep, 0.4, [(chat, 6), (line, len(added[line][1].prompt_token_ids))],
                   [_out(chat, [1]), _out(line, [1])])
        router.on_lost("rank 0 exited")  # the chat's stream ends; the line goes back to pending
        await router.flush_writes()
        # outputs of the lost launch that still arrive are ignored
        router.on_outputs(rep, wpb.StepOutputs(outputs=[_out(chat, [2], pb.FINISH_REASON_STOP)]))
        assert _counts(router.meter) == {"alice": (1, 6, 1)}
        router.on_ready()
        await router._feed_once()
        (rerun, (_, add)), = _added(rep).items()
        steps.tenant_of[rerun] = "carol"
        steps.step(rep, 0.1, [(rerun, len(add.prompt_token_ids))], [_out(rerun, [5, 6], pb.FINISH_REASON_LENGTH)])
        await router.flush_writes()
        assert _counts(router.meter) == {"alice": (1, 6, 1), "carol": (1, len(add.prompt_token_ids), 2)}
        steps.check(router.meter)
        store.close()

    asyncio.run(main())


def test_disaggregated_requests_are_metered_on_both_replicas_and_counted_once(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        p, d = _replica(0, pb.REPLICA_ROLE_PREFILL, num_ranks=2), _replica(1, pb.REPLICA_ROLE_DECODE)
        router = _router(frontend, store, p, d)
        assert router.disaggregated
        store.create_batch(chat_line("l", "a longer prompt for the batch line", max_tokens=3).encode(), tenant="carol")
        E = router.submit("chat-e", [3] * 9, SamplingParams(max_tokens=2), CHAT, tenant="erin").req_id
        F = router.submit("chat-f", [3] * 5, SamplingParams(max_tokens=2), CHAT, tenant="fred").req_id
        await router._feed_once()
        on_p = _added(p)
        assert _added(d) == {} and all(a.prefill_only for _, a in on_p.values())
        line = next(rid for rid in on_p if rid.startswith("batch-"))
        plen = {rid: len(a.prompt_token_ids) for rid, (_, a) in on_p.items()}
        steps = Steps(router, {E: "erin", F: "fred", line: "carol"})
        # prefill-only step on P: shares, no output
        steps.step(p, 0.5, [(rid, n) for rid, n in plen.items()])
        assert router.abort_for("fred", "chat-f")  # fred's abort crosses the end of its prefill
        for rid in (E, F, line):
            router.on_outputs(p, wpb.StepOutputs(outputs=[_out(rid, kv_event=wpb.KvEvent(ready=wpb.KvReady(
                block_ids=[1], num_tokens=plen[rid] - 1)))]))
        on_d = _added(d)
        assert set(on_d) == {E, line} and all(a.HasField("remote_prefill") for _, a in on_d.values())
        assert _counts(router.meter) == {"fred": (1, 5, 0)}
        # P's abort output for fred arrives later: already counted
        router.on_outputs(p, wpb.StepOutputs(outputs=[_out(F, [], pb.FINISH_REASON_ABORT)]))
        for rid in on_d:
            router.on_outputs(d, wpb.StepOutputs(outputs=[_out(rid, kv_event=wpb.KvEvent(recv_meta_json="{}"))]))
        # erin's transfer fails: D computes the prompt itself, P releases (and reports an abort)
        router.on_outputs(d, wpb.StepOutputs(outputs=[
            _out(E, kv_event=wpb.KvEvent(result=wpb.KvTransferResult(is_send=False, success=False))),
            _out(line, kv_event=wpb.KvEvent(result=wpb.KvTransferResult(is_send=False, success=True)))]))
        router.on_outputs(p, wpb.StepOutputs(outputs=[_out(E, [], pb.FINISH_REASON_ABORT)]))
        steps.step(d, 0.2, [(E, plen[E]), (line, 1)], [_out(E, [1]), _out(line, [1])])
        steps.step(d, 0.1, [(E, 1), (line, 1)], [_out(E, [2], pb.FINISH_REASON_LENGTH), _out(line, [2])])
        steps.step(d, 0.1, [(line, 1)], [_out(line, [3], pb.FINISH_REASON_LENGTH)])
        await router.flush_writes()
        assert _counts(router.meter) == {"fred": (1, 5, 0), "erin": (1, 9, 2), "carol": (1, plen[line], 3)}
        steps.check(router.meter)
        assert not router.inflight
        store.close()

    asyncio.run(main())


def test_feeder_leaves_the_excluded_tenants_lines_pending(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        rep = _replica(0)
        router = _router(frontend, store, rep)
        carol = store.create_batch(chat_line("x", "hi", max_tokens=2).encode(), tenant="carol")
        excluded = {"carol"}
        router.exclude_tenants = lambda: excluded
        await router._feed_once()
        assert _added(rep) == {} and store.get_batch(carol["id"])["request_counts"]["completed"] == 0
        dave = store.create_batch(chat_line("y", "hello", max_tokens=2).encode(), tenant="dave")
        await router._feed_once()
        assert {inf.line.batch_id for inf in router.inflight.values()} == {dave["id"]}
        excluded.clear()  # e.g. a new UTC day: carol's quota is back
        await router._feed_once()
        assert {inf.line.batch_id for inf in router.inflight.values()} == {dave["id"], carol["id"]}
        assert {inf.tenant for inf in router.inflight.values()} == {"dave", "carol"}
        _added(rep)
        store.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------- useful seconds
def _useful_step(router, rep, time_s: float, shares: list[tuple[str, int, float]], outputs=()) -> None:
    router.on_outputs(rep, wpb.StepOutputs(
        step_time_s=time_s, outputs=list(outputs),
        shares=[wpb.StepShare(request_id=r, num_tokens=n, useful_s=u) for r, n, u in shares]))


def _useful(meter) -> dict[tuple[str, str], float]:
    return {(t, k[len("useful_seconds_"):]): row[k] for t, row in meter.snapshot().items()
            for k in ("useful_seconds_interactive", "useful_seconds_batch") if abs(row[k]) > 1e-12}


def test_undelivered_batch_work_is_debited_and_chat_work_is_kept(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        rep = _replica(0, num_ranks=2)
        router = _router(frontend, store, rep)
        batch = store.create_batch("\n".join(chat_line(f"c{i}", f"line {i}", max_tokens=4) for i in range(3))
                                   .encode(), tenant="carol")
        chat = router.submit("chat", [5] * 6, SamplingParams(max_tokens=4), CHAT, tenant="alice").req_id
        gone = router.submit("gone", [5] * 6, SamplingParams(max_tokens=4), CHAT, tenant="bob").req_id
        await router._feed_once()
        lines = sorted((rid for rid in _added(rep) if rid.startswith("batch-")),
                       key=lambda rid: router.inflight[rid].line.line_no)
        l0, l1, l2 = lines
        # prefill: every request earns; "stale" (unknown to the router) earns nobody anything
        _useful_step(router, rep, 1.0, [(chat, 6, 0.1), (gone, 6, 0.1), (l0, 7, 0.2), (l1, 7, 0.2),
                                        (l2, 7, 0.2), ("stale", 3, 0.1)],
                     [_out(r, [1]) for r in (chat, gone, l0, l1, l2)])
        assert _useful(router.meter) == pytest.approx({("alice", "interactive"): 0.2, ("bob", "interactive"): 0.2,
                                                       ("carol", "batch"): 1.2})
        # bob's client goes away: what streamed was delivered; l0 finishes; l1 is aborted (requeued),
        # l2 gets an error line
        assert router.abort_for("bob", "gone")
        _useful_step(router, rep, 0.2, [(chat, 1, 0.01), (l0, 1, 0.02), (l1, 1, 0.02)],
                     [_out(gone, [], pb.FINISH_REASON_ABORT), _out(chat, [2]),
                      _out(l0, [2, 3, 4], pb.FINISH_REASON_LENGTH), _out(l1, [], pb.FINISH_REASON_ABORT),
                      _out(l2, [], pb.FINISH_REASON_ERROR, error_code="bad", error_message="x")])
        await router.flush_writes()
        assert _useful(router.meter) == pytest.approx({("alice", "interactive"): 0.22, ("bob", "interactive"): 0.2,
                                                       ("carol", "batch"): 2 * (0.2 + 0.02)})  # l0 only
        # l1 runs again and finishes: its new run is delivered, the old one stays debited
        await router._feed_once()
        (rerun, _), = _added(rep).items()
        _useful_step(router, rep, 0.5, [(rerun, 7, 0.3)], [_out(rerun, [1, 2, 3, 4], pb.FINISH_REASON_LENGTH)])
        await router.flush_writes()
        assert _useful(router.meter)[("carol", "batch")] == pytest.approx(0.44 + 0.6)
        # a line in flight when the launch is lost is requeued: debited; the chat keeps its credit
        store.create_batch(chat_line("late", "again", max_tokens=4).encode(), tenant="carol")
        await router._feed_once()
        (late, _), = _added(rep).items()
        _useful_step(router, rep, 0.5, [(late, 5, 0.3), (chat, 1, 0.01)], [_out(late, [1]), _out(chat, [3])])
        router.on_lost("rank 0 exited")
        await router.flush_writes()
        useful = _useful(router.meter)
        assert useful == pytest.approx({("alice", "interactive"): 0.24, ("bob", "interactive"): 0.2,
                                        ("carol", "batch"): 1.04})
        total = router.meter.totals()
        assert total["gpu_seconds"] == pytest.approx(2 * (1.0 + 0.2 + 0.5 + 0.5))
        assert total["useful_seconds_batch"] + total["useful_seconds_interactive"] <= total["gpu_seconds"]
        info = store.get_batch(batch["id"])
        assert (info["request_counts"]["completed"], info["request_counts"]["failed"]) == (2, 1)
        store.close()

    asyncio.run(main())


def test_failed_kv_handoff_debits_the_prefill_replicas_part(frontend, tmp_path):
    async def main():
        store = BatchStore(tmp_path / "state")
        p, d = _replica(0, pb.REPLICA_ROLE_PREFILL, num_ranks=2), _replica(1, pb.REPLICA_ROLE_DECODE)
        router = _router(frontend, store, p, d)
        store.create_batch(chat_line("l", "a longer prompt for the batch line", max_tokens=2).encode(), tenant="carol")
        e = router.submit("e", [3] * 9, SamplingParams(max_tokens=2), CHAT, tenant="erin").req_id
        await router._feed_once()
        on_p = _added(p)
        line = next(rid for rid in on_p if rid.startswith("batch-"))
        plen = {rid: len(a.prompt_token_ids) for rid, (_, a) in on_p.items()}
        _useful_step(router, p, 0.5, [(e, plen[e], 0.1), (line, plen[line], 0.2)])  # x2 ranks
        for rid in (e, line):
            router.on_outputs(p, wpb.StepOutputs(outputs=[_out(rid, kv_event=wpb.KvEvent(ready=wpb.KvReady(
                block_ids=[1], num_tokens=plen[rid] - 1)))]))
        _added(d)
        for rid in (e, line):
            router.on_outputs(d, wpb.StepOutputs(outputs=[_out(rid, kv_event=wpb.KvEvent(recv_meta_json="{}"))]))
        router.on_outputs(d, wpb.StepOutputs(outputs=[  # erin's transfer fails, the line's succeeds
            _out(e, kv_event=wpb.KvEvent(result=wpb.KvTransferResult(is_send=False, success=False))),
            _out(line, kv_event=wpb.KvEvent(result=wpb.KvTransferResult(is_send=False, success=True)))]))
        assert _useful(router.meter) == pytest.approx({("carol", "batch"): 0.4})  # erin's 0.2 taken back
        # D recomputes erin's prompt (and earns it), and computes the line's last prompt token
        _useful_step(router, d, 0.3, [(e, plen[e], 0.15), (line, 1, 0.01)], [_out(e, [1]), _out(line, [1])])
        _useful_step(router, d, 0.1, [(e, 1, 0.02), (line, 1, 0.02)],
                     [_out(e, [2], pb.FINISH_REASON_LENGTH), _out(line, [2], pb.FINISH_REASON_LENGTH)])
        await router.flush_writes()
        assert _useful(router.meter) == pytest.approx({("erin", "interactive"): 0.17, ("carol", "batch"): 0.43})
        store.close()

    asyncio.run(main())

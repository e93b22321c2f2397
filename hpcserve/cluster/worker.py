"""Worker rank main (``hpcserve worker``): the same program on every rank of the worker step.

The daemon launches the step as one MPI world (``mpiexec -n N hpcserve worker``, or
``srun`` under Slurm) and passes the spec in the environment, never on the command line
(the secret would show in ``ps``):

- ``HPCSERVE_WORKER_DAEMON``: host:port of the daemon's WorkerLink service;
- ``HPCSERVE_WORKER_SECRET``: per-launch secret; a stale rank of an older launch is refused;
- ``HPCSERVE_WORKER_CONFIG``: JSON of ``engine.core.EngineConfig`` fields;
- ``HPCSERVE_WORKER_TLS_CA`` (only when the daemon serves TLS): PEM text of the certificate the
  leaders trust when they dial the daemon (``daemon/tls.py``); unset: a plaintext link;
- ``HPCSERVE_WORKER_DISAGG`` (only with prefill/decode roles): JSON ``{"roles": [role per rank],
  "timeout_s", "checksum", "group_bytes"}``. Every rank then builds an ``MpiConnector``
  (collective) and attaches a KV handoff to its engine (``engine/handoff.py``).

Rank lifecycle:
  1. init MPI; an uncaught exception on any rank aborts the whole world (``MPI_Abort``), so
     the daemon sees one failure and relaunches the step;
  2. layout: every rank is its own replica today (tensor-parallel size 1), so every rank
     is a replica leader; ``replica_id == rank``;
  3. build the ``LLMEngine`` (torch threads = the cores of this node / its ranks, unless set);
  4. barrier: every rank has loaded the model;
  5. the leader dials the daemon, sends ``Hello``, waits for ``Welcome``, runs the replica loop;
  6. exit 0 after ``Shutdown``; exit 3 when the link to the daemon breaks (the daemon died or
     gave up on this launch).

Replica event loop (``ReplicaLoop.run``), one per leader, as a table of contents::

    recv    drain the link's inbox; block up to REPORT_INTERVAL_S only when the engine is idle
    admit   AddRequest -> engine.add_request (prefill_only: a prefill replica's request) or
            engine.add_remote_request (remote_prefill: the KV comes from a prefill rank); a
            rejection is sent back as a finish ERROR output
            AbortRequests -> engine.abort_request; StartKvSend -> handoff.start_send;
            Shutdown -> stop admitting (drain) or abort all
    handoff handoff.poll(): finished transfers, receives that got blocks; its events (ready,
            recv_meta, result) go to the daemon at once, before the step
    run     engine.step() when there is work
    send    StepOutputs with every request that produced tokens or finished, the step's wall time
            and each scheduled request's token share and useful-work credit (sent even when no
            request produced output)
    report  LoadReport every REPORT_INTERVAL_S, and right after a step that finished requests
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import socket
import sys
import threading
import time

log = logging.getLogger("hpcserve.worker")

REPORT_INTERVAL_S = 0.25
CONNECT_TIMEOUT_S = 60.0
EXIT_LINK_LOST = 3
ENV_DAEMON, ENV_SECRET, ENV_CONFIG = "HPCSERVE_WORKER_DAEMON", "HPCSERVE_WORKER_SECRET", "HPCSERVE_WORKER_CONFIG"
ENV_DISAGG = "HPCSERVE_WORKER_DISAGG"
SEND_GROUPS_IN_FLIGHT = 256  # KV handoff: layer-group sends posted at once per transfer (at most its groups)
HANDOFF_WAIT_S = 0.002  # idle wait between polls while only KV transfers are in flight


class LinkLost(Exception):
    """The stream to the daemon ended or failed."""


class LeaderLink:
    """Client side of ``WorkerLink.Connect`` on a synchronous gRPC channel: a sender iterator fed
    from a queue, a reader thread filling ``inbox``. ``recv`` raises ``LinkLost`` at the end."""

    _EOF = object()

    def __init__(self, address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
        import grpc

        from hpcserve.api.v1 import worker_pb2_grpc
        from hpcserve.daemon.tls import WORKER_CA_ENV, grpc_channel_credentials

        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        ca_pem = os.environ.get(WORKER_CA_ENV)
        self.channel = (grpc.secure_channel(address, grpc_channel_credentials(ca_pem), options=options) if ca_pem
                        else grpc.insecure_channel(address, options=options))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            tls = (f" over TLS (does the daemon's certificate name {address.rpartition(':')[0]} in a "
                   "SubjectAltName?)") if ca_pem else ""
            raise LinkLost(f"cannot reach the daemon at {address} within {timeout:.0f} s{tls}") from None
        self._out: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self._call = worker_pb2_grpc.WorkerLinkStub(self.channel).Connect(self._requests())
        self._reader = threading.Thread(target=self._read, name="link-reader", daemon=True)
        self._reader.start()
        self.error: str | None = None

    def _requests(self):
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        import grpc

        try:
            for msg in self._call:
                self.inbox.put(msg)
        except grpc.RpcError as exc:  # the daemon went away
            self.error = exc.details() or str(exc.code())
        self.inbox.put(self._EOF)

    def send(self, msg) -> None:
        self._out.put(msg)

    def recv(self, timeout: float | None) -> list:
        """Every message waiting now; waits up to ``timeout`` for the first (None: don't wait)."""
        msgs = []
        try:
            msgs.append(self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait())
            while True:
                msgs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        if any(m is self._EOF for m in msgs):
            raise LinkLost(self.error or "the daemon closed the link")
        return msgs

    def take_nowait(self) -> list:
        """Every message waiting now, without waiting; the end-of-stream mark stays queued for ``recv``."""
        msgs = []
        while True:
            try:
                m = self.inbox.get_nowait()
            except queue.Empty:
                return msgs
            if m is self._EOF:
                self.inbox.put(m)
                return msgs
            msgs.append(m)

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()


class ReplicaLoop:
    """Drives one replica's ``LLMEngine`` from the daemon's messages; see the module docstring."""

    def __init__(self, engine, link: LeaderLink, pending: list | None = None) -> None:
        self.engine = engine
        self.link = link
        self._pending = list(pending or [])  # messages that arrived together with Welcome
        self.step_times: collections.deque[float] = collections.deque(maxlen=32)
        self.num_steps = 0
        self.busy_time_s = 0.0
        self.num_output_tokens = {True: 0, False: 0}  # is_batch -> tokens generated
        self._is_batch: dict[str, bool] = {}
        self.draining = False
        self._last_report = 0.0
        if engine.handoff is not None:
            engine.runner.model.layer_hook = self._between_layers

    def run(self) -> None:
        from hpcserve.api.v1 import worker_pb2 as wpb

        while True:
            busy = self.engine.has_unfinished_requests()
            wait = None if busy or self._pending else HANDOFF_WAIT_S if self.engine.has_handoff_work() \
                else REPORT_INTERVAL_S
            msgs = self._pending + self.link.recv(wait)                          # recv
            self._pending = []
            out = wpb.StepOutputs()
            for m in msgs:                                                       # admit
                if not self._handle(m, out):
                    self._send_outputs(out)
                    return
            if self.engine.handoff is not None:                                  # handoff
                self._handoff_events(out)
                self._send_outputs(out)
                out = wpb.StepOutputs()
            if self.engine.has_unfinished_requests():                            # run
                t0 = time.perf_counter()
                for o in self.engine.step():
                    out.outputs.append(self._to_proto(o))
                    is_batch = self._is_batch.pop(o.req_id, False) if o.finished else self._is_batch.get(o.req_id)
                    self.num_output_tokens[bool(is_batch)] += len(o.new_token_ids)
                dt = time.perf_counter() - t0
                out.token_time = self.engine.last_token_time  # the engine's timestamp of these tokens
                out.step_time_s = dt  # usage accounting: the step's time, split by these token shares
                out.shares.extend(wpb.StepShare(request_id=sh.req_id, num_tokens=sh.num_tokens, useful_s=sh.useful_s)
                                  for sh in self.engine.last_step_shares)
                self.step_times.append(dt)
                self.busy_time_s += dt
                self.num_steps += 1
            finished = self._send_outputs(out)                                   # send
            if finished or time.monotonic() - self._last_report >= REPORT_INTERVAL_S:
                self._report()                                                   # report
            if self.draining and not self.engine.has_unfinished_requests() and not self.engine.has_handoff_work():
                self._report()
                return

    def _handle(self, m, out) -> bool:
        """Apply one daemon message; False means stop the loop now."""
        from hpcserve.api.convert import sampling_from_proto
        from hpcserve.api.v1 import serving_pb2 as pb
        from hpcserve.engine.request import PRIORITY_BATCH, PRIORITY_INTERACTIVE
        from hpcserve.errors import RequestError

        kind = m.WhichOneof("kind")
        if kind == "add_request":
            a = m.add_request
            prio = PRIORITY_BATCH if a.request_class == pb.REQUEST_CLASS_BATCH else PRIORITY_INTERACTIVE
            try:
                if self.draining:
                    raise RequestError("the replica is shutting down", code="unavailable")
                params = sampling_from_proto(a.sampling_params, default_max_tokens=16)
                if a.HasField("remote_prefill"):
                    rp = a.remote_prefill
                    self.engine.add_remote_request(a.request_id, list(a.prompt_token_ids), params, prio, rp.src_rank,
                                                   list(rp.src_block_ids), rp.num_tokens, rp.num_cached_tokens,
                                                   cache_salt=a.cache_salt)
                else:
                    self.engine.add_request(a.request_id, list(a.prompt_token_ids), params, priority=prio,
                                            prefill_only=a.prefill_only, cache_salt=a.cache_salt)
                if not a.prefill_only:
                    self._is_batch[a.request_id] = prio == PRIORITY_BATCH
            except RequestError as exc:
                out.outputs.add(request_id=a.request_id, is_finished=True, finish_reason=pb.FINISH_REASON_ERROR,
                                error_code=exc.code, error_message=str(exc))
        elif kind == "abort_requests":
            for rid in m.abort_requests.request_ids:
                self.engine.abort_request(rid)
        elif kind == "start_kv_send":
            k = m.start_kv_send
            try:
                if self.engine.handoff is None:
                    raise RuntimeError("this replica has no KV handoff")
                self.engine.handoff.start_send(k.request_id, json.loads(k.meta_json))
            except Exception as exc:  # noqa: BLE001 - a bad handoff must not take the replica down
                log.error("request %s: cannot start the KV send: %s", k.request_id, exc)
        elif kind == "shutdown":
            self.draining = True
            if not m.shutdown.drain:
                for rid in list(self.engine.scheduler.requests):
                    self.engine.abort_request(rid)
                for o in self.engine.step() if self.engine.has_unfinished_requests() else []:
                    out.outputs.append(self._to_proto(o))
                return False
        return True

    def _between_layers(self) -> None:
        """Layer hook during a forward pass: start the KV sends the daemon asked for, post the
        receives of handed-off prompts and report their events now rather than after the step, so a
        handoff never waits a whole step of either peer. Other messages stay queued, in order, for
        the loop; nothing here preempts (``handoff.poll(in_step=True)``)."""
        from hpcserve.api.v1 import worker_pb2 as wpb

        out = wpb.StepOutputs()
        if not self.link.inbox.empty():
            for m in self.link.take_nowait():
                kind = m.WhichOneof("kind")
                if kind == "start_kv_send" or (kind == "add_request" and m.add_request.HasField("remote_prefill")
                                               and not self.draining):
                    self._handle(m, out)
                else:
                    self._pending.append(m)
        if self.engine.has_handoff_work():
            self._handoff_events(out, in_step=True)
        self._send_outputs(out)

    def _handoff_events(self, out, in_step: bool = False) -> None:
        from hpcserve.api.v1 import worker_pb2 as wpb

        for kind, rid, payload in self.engine.handoff.poll(in_step=in_step):
            if kind == "ready":
                ev = wpb.KvEvent(ready=wpb.KvReady(**payload))
            elif kind == "recv_meta":
                ev = wpb.KvEvent(recv_meta_json=json.dumps(payload))
            else:
                ev = wpb.KvEvent(result=wpb.KvTransferResult(
                    is_send=payload["is_send"], success=payload["success"], nbytes=payload["nbytes"],
                    seconds=payload["seconds"], error=payload["error"],
                    checksum_verified=payload["checksum_verified"], peer_rank=payload["peer"]))
            out.outputs.add(request_id=rid, kv_event=ev)

    def _to_proto(self, o):
        from hpcserve.api.convert import finish_reason_to_proto, logprobs_to_proto
        from hpcserve.api.v1 import worker_pb2 as wpb

        return wpb.RequestStepOutput(
            request_id=o.req_id, new_token_ids=o.new_token_ids, new_text=o.new_text,
            new_logprobs=logprobs_to_proto(o.new_logprobs), is_finished=o.finished,
            finish_reason=finish_reason_to_proto(o.finish_reason) if o.finished else 0,
            num_cached_tokens=o.num_cached_tokens,
        )

    def _send_outputs(self, out) -> bool:
        from hpcserve.api.v1 import worker_pb2 as wpb

        if not out.outputs and not out.shares:  # a step with shares but no output still reports its time
            return False
        self.link.send(wpb.WorkerMessage(step_outputs=out))
        return any(o.is_finished for o in out.outputs)

    def _report(self) -> None:
        from hpcserve.api.v1 import serving_pb2 as pb
        from hpcserve.api.v1 import worker_pb2 as wpb

        sched = self.engine.scheduler
        recent = sum(self.step_times) / len(self.step_times) if self.step_times else 0.0
        self.link.send(wpb.WorkerMessage(load_report=wpb.LoadReport(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_free_kv_blocks=self.engine.kv.num_free_blocks, num_kv_blocks=self.engine.kv.num_blocks,
            recent_step_time_s=recent, num_preemptions=sched.num_preemptions, num_steps=self.num_steps,
            num_output_tokens_interactive=self.num_output_tokens[False],
            num_output_tokens_batch=self.num_output_tokens[True], busy_time_s=self.busy_time_s,
            kv=pb.KvHandoffInfo(**self.engine.handoff.counters()) if self.engine.handoff is not None else None)))
        self._last_report = time.monotonic()


def _local_ranks(world) -> int:
    from mpi4py import MPI

    node = world.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main() -> int:
    """Entry point of ``hpcserve worker``; returns the exit code."""
    from hpcserve.cluster.comm import abort_on_exception, init_mpi

    world = init_mpi()
    abort_on_exception(world)
    logging.basicConfig(level=os.environ.get("HPCSERVE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {world.tag}%(levelname)s %(message)s")
    missing = [k for k in (ENV_DAEMON, ENV_SECRET, ENV_CONFIG) if not os.environ.get(k)]
    if missing:
        print(f"hpcserve worker: error: {', '.join(missing)} not set; workers are started by "
              "`hpcserve serve`, not by hand", file=sys.stderr)
        return 2
    fields = json.loads(os.environ[ENV_CONFIG])
    if not fields.get("num_threads"):
        fields["num_threads"] = max(1, _cores() // _local_ranks(world))

    from hpcserve.engine.core import EngineConfig, LLMEngine

    t0 = time.monotonic()
    engine = LLMEngine(EngineConfig(**fields))
    log.info("model loaded in %.1f s (%d KV blocks, max_model_len %d, %d threads)", time.monotonic() - t0,
             engine.kv.num_blocks, engine.max_model_len, fields["num_threads"])
    t0 = time.monotonic()
    engine.calibrate()
    log.info("warm-up and step-time calibration in %.1f s: t = %s", time.monotonic() - t0,
             engine.cost_model.coefficients)
    role = _attach_handoff(world, engine)
    world.comm.Barrier()
    return _serve(world, engine, role)


def _attach_handoff(world, engine) -> str:
    """With prefill/decode roles (``HPCSERVE_WORKER_DISAGG``) every rank builds the MPI
    connector (collective) and attaches a KV handoff to its engine; returns this rank's role."""
    spec = json.loads(os.environ.get(ENV_DISAGG) or "{}")
    roles = spec.get("roles") or []
    if not roles:
        return "mixed"
    if len(roles) != world.size:
        raise RuntimeError(f"{ENV_DISAGG} names {len(roles)} roles for {world.size} ranks")
    from hpcserve.transfer.mpi import MpiConnector

    # every group posted at once (num_staging): the ranks poll only between layers and steps, and
    # the receiver can then pull the whole request without waiting for the sender's next poll
    connector = MpiConnector(world, timeout_s=float(spec.get("timeout_s", 30.0)), checksum=bool(spec.get("checksum")),
                             num_staging=SEND_GROUPS_IN_FLIGHT)
    engine.attach_handoff(connector, world.rank, target_group_bytes=int(spec.get("group_bytes", 2 << 20)))
    log.info("role %s; KV handoff over MPI (timeout %.0f s, checksum %s)", roles[world.rank], connector.timeout_s,
             connector.checksum)
    return roles[world.rank]


def _serve(world, engine, role: str = "mixed") -> int:
    from hpcserve.api.v1 import serving_pb2 as pb
    from hpcserve.api.v1 import worker_pb2 as wpb

    try:
        link = LeaderLink(os.environ[ENV_DAEMON])
    except LinkLost as exc:
        log.error("%s", exc)
        return EXIT_LINK_LOST
    link.send(wpb.WorkerMessage(hello=wpb.Hello(
        rank=world.rank, replica_id=world.rank, world_size=world.size,
        role={"prefill": pb.REPLICA_ROLE_PREFILL, "decode": pb.REPLICA_ROLE_DECODE}.get(role, pb.REPLICA_ROLE_MIXED),
        secret=os.environ[ENV_SECRET], hostname=socket.gethostname(), pid=os.getpid(),
        max_model_len=engine.max_model_len, num_kv_blocks=engine.kv.num_blocks,
        block_size=engine.kv.block_size, num_ranks=1)))
    try:
        first = link.recv(CONNECT_TIMEOUT_S)
        if not first or first[0].WhichOneof("kind") != "welcome":
            log.error("the daemon did not welcome this replica")
            return EXIT_LINK_LOST
        ReplicaLoop(engine, link, pending=first[1:]).run()
    except LinkLost as exc:
        log.warning("link to the daemon lost (%s); exiting", exc)
        return EXIT_LINK_LOST
    finally:
        link.close()
    return 0

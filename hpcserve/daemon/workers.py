"""The worker step as seen from the daemon: launch, link, watch, relaunch. No torch.

``WorkerPool`` owns one *launch* at a time: a ``LAUNCHER hpcserve worker`` process group
(``mpiexec -n N`` locally, ``srun --mpi=PLUGIN --overlap -n N`` inside a Slurm allocation: see
``launcher_command``) (its own session, so it can be killed whole), a fresh secret, and the replicas whose
leaders dialled back. It also implements the daemon side of ``WorkerLink.Connect``. With TLS on
(``tls_ca_pem``), the ranks get that PEM text in ``HPCSERVE_WORKER_TLS_CA`` and dial over TLS.

Launch lifecycle (``WorkerPool.run``, a task on the daemon's event loop)::

    launch ──every replica said Hello──► ready ──process exit | link lost──► failed
       ▲                                   │                                   │
       └──── backoff (1, 2, 4 … 30 s) ◄────┴── on_lost(reason) to the router ◄─┘
    stop(): Shutdown(drain) to every replica → wait for exit → kill the group

Callbacks into the router (all on the event loop): ``on_ready()``, ``on_outputs(replica,
StepOutputs)``, ``on_lost(reason)``. Messages from a launch that already failed are
dropped, so a failure is handled exactly once. More than ``restart_limit`` failures in a
row (a failure after ``HEALTHY_AFTER_S`` of service resets the count) sets ``fatal`` and
ends ``run``; the daemon then exits non-zero with that message.

Logs of every launch go to ``state_dir/logs/workers.log``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import worker_pb2 as wpb
from hpcserve.api.v1 import worker_pb2_grpc
from hpcserve.cluster.worker import ENV_CONFIG, ENV_DAEMON, ENV_DISAGG, ENV_SECRET
from hpcserve.daemon.tls import WORKER_CA_ENV

log = logging.getLogger("hpcserve.daemon")

HEALTHY_AFTER_S = 60.0
KILL_GRACE_S = 5.0


@dataclass
class Replica:
    """A connected replica leader and its latest load."""

    replica_id: int
    launch_id: int
    hello: wpb.Hello
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    load: wpb.LoadReport = field(default_factory=wpb.LoadReport)
    num_inflight: int = 0  # requests the router has given it and not seen finish
    num_inflight_batch: int = 0
    batch_kv_reserved: int = 0  # KV blocks the batch lines in flight may grow to
    num_inflight_batch_here: int = 0  # batch lines running here now (a prefill replica's share)
    kv_promised: int = 0  # decode replica: KV blocks of handoffs sent since it posted their receives

    def send(self, msg: wpb.DaemonMessage) -> None:
        self.outbox.put_nowait(msg)

    is_chat_only: bool = False  # daemon.dedicated-chat-replicas
    is_batch_only: bool = False

    def info(self) -> pb.ReplicaInfo:
        ld = self.load
        return pb.ReplicaInfo(
            replica_id=self.replica_id, role=self.hello.role, ranks=[self.hello.rank],
            num_running=ld.num_running, num_waiting=ld.num_waiting, num_free_kv_blocks=ld.num_free_kv_blocks,
            num_kv_blocks=ld.num_kv_blocks or self.hello.num_kv_blocks, recent_step_time_s=ld.recent_step_time_s,
            num_output_tokens_interactive=ld.num_output_tokens_interactive,
            num_output_tokens_batch=ld.num_output_tokens_batch, busy_time_s=ld.busy_time_s,
            num_steps=ld.num_steps, num_preemptions=ld.num_preemptions,
            is_chat_only=self.is_chat_only, is_batch_only=self.is_batch_only,
            kv=ld.kv)


def launcher_command(num_ranks: int, mpiexec: str, slurm=None, env=None) -> list[str]:
    """How the worker step starts: the venv's ``mpiexec -n N`` locally; inside a Slurm allocation
    (``slurm``: the ``[slurm]`` config table) ``srun --mpi=PLUGIN --overlap -n N`` as a step of the
    daemon's own job (``--overlap``: it shares the job's CPUs with the batch script), with
    ``--kill-on-bad-exit`` so that one dead rank ends the step and the daemon relaunches it. In a
    heterogeneous job (``SLURM_HET_SIZE`` set: hetjob.sbatch) the step spans every component
    (``--het-group=0,...``, no ``-n``: each component runs its own task count), as one MPI world in
    component order."""
    if slurm is None:
        return [mpiexec, "-n", str(num_ranks)]
    import shlex

    env = os.environ if env is None else env
    het = int(env.get("SLURM_HET_SIZE") or 0)
    size = [f"--het-group={','.join(str(i) for i in range(het))}"] if het > 1 else ["-n", str(num_ranks)]
    return ["srun", f"--mpi={slurm.mpi}", "--overlap", "--kill-on-bad-exit=1", *size, *shlex.split(slurm.srun_args)]


def worker_command() -> list[str]:
    """``hpcserve worker`` of this installation (the console script next to the interpreter)."""
    script = Path(sys.executable).parent / "hpcserve"
    if script.exists():
        return [str(script), "worker"]
    return [sys.executable, "-m", "hpcserve", "worker"]


class WorkerPool(worker_pb2_grpc.WorkerLinkServicer):
    def __init__(self, *, num_ranks: int, launcher: list[str], engine_fields: dict, link_address: str,
                 log_dir: Path, restart_limit: int, start_timeout_s: float, router,
                 disagg: dict | None = None, launch_env: dict[str, str] | None = None,
                 tls_ca_pem: str | None = None) -> None:
        self.num_ranks = num_ranks
        self.launcher = launcher  # command prefix that starts num_ranks copies of the worker as one MPI world
        self.launch_env = dict(launch_env or {})  # extra environment of the worker step (site MPI settings)
        self.engine_fields = engine_fields
        self.link_address = link_address
        self.log_dir = log_dir
        self.restart_limit = restart_limit
        self.start_timeout_s = start_timeout_s
        self.router = router
        self.disagg = disagg  # worker-side handoff spec (roles per rank, ...) or None: all mixed
        self.tls_ca_pem = tls_ca_pem  # PEM text the leaders trust when they dial link_address; None: plaintext
        self.replicas: dict[int, Replica] = {}
        self.launch_id = 0
        self.num_restarts = 0
        self.fatal: str | None = None
        self._secret = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._failed: asyncio.Future | None = None
        self._all_connected = asyncio.Event()
        self._stopping = False

    @property
    def is_ready(self) -> bool:
        return self._all_connected.is_set() and not self._stopping and self._failed is not None \
            and not self._failed.done()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            reason, served_s = await self._one_launch()
            if self._stopping:
                break
            failures = 1 if served_s >= HEALTHY_AFTER_S else failures + 1
            if failures > self.restart_limit:
                self.fatal = (f"the worker step failed {failures} times in a row (last: {reason}); "
                              f"giving up. See {self.log_dir / 'workers.log'}")
                log.error("%s", self.fatal)
                return
            delay = min(30.0, 2.0 ** (failures - 1))
            log.warning("worker step failed (%s); relaunching in %.0f s (%d/%d)", reason, delay, failures,
                        self.restart_limit)
            self.num_restarts += 1
            await asyncio.sleep(delay)

    async def _one_launch(self) -> tuple[str, float]:
        """Run one launch to its end; returns (why it ended, seconds it served)."""
        loop = asyncio.get_running_loop()
        self.launch_id += 1
        self._secret = secrets.token_hex(16)
        self._failed = loop.create_future()
        self._all_connected.clear()
        self.replicas = {}
        try:
            self._proc = await self._spawn()
        except OSError as exc:
            return f"cannot start {self.launcher[0]}: {exc}", 0.0
        watcher = asyncio.create_task(self._watch_exit(self._proc, self.launch_id))
        t_ready = None
        try:
            try:
                await asyncio.wait_for(self._wait_connected(), self.start_timeout_s)
                t_ready = time.monotonic()
                log.info("worker step ready: %d replica(s) on %d rank(s)", len(self.replicas), self.num_ranks)
                self.router.on_ready()
            except asyncio.TimeoutError:
                self._fail(f"the replicas did not connect within {self.start_timeout_s:.0f} s")
            reason = await self._failed
        finally:
            watcher.cancel()
        served = time.monotonic() - t_ready if t_ready else 0.0
        self._all_connected.clear()
        self.router.on_lost(reason)
        await self._kill(self._proc)
        return reason, served

    async def _wait_connected(self) -> None:
        await asyncio.wait([asyncio.ensure_future(self._all_connected.wait()), self._failed],
                           return_when=asyncio.FIRST_COMPLETED)

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.launch_env)
        env.update({ENV_DAEMON: self.link_address, ENV_SECRET: self._secret,
                    ENV_CONFIG: json.dumps(self.engine_fields)})
        if self.disagg:
            env[ENV_DISAGG] = json.dumps(self.disagg)
        else:
            env.pop(ENV_DISAGG, None)
        if self.tls_ca_pem:
            env[WORKER_CA_ENV] = self.tls_ca_pem
        else:
            env.pop(WORKER_CA_ENV, None)
        cmd = [*self.launcher, *worker_command()]
        logf = open(self.log_dir / "workers.log", "ab")  # noqa: SIM115, ASYNC230 - the child keeps it; closed below
        logf.write(f"\n=== launch {self.launch_id} at {time.strftime('%F %T')}: {' '.join(cmd)}\n".encode())
        logf.flush()
        try:
            return await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=logf, stderr=logf, start_new_session=True)
        finally:
            logf.close()

    async def _watch_exit(self, proc, launch_id: int) -> None:
        code = await proc.wait()
        if launch_id == self.launch_id:
            how = f"signal {-code}" if code < 0 else f"code {code}"
            self._fail(f"the worker step exited with {how}")

    def _fail(self, reason: str) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(reason)

    async def _kill(self, proc) -> None:
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except asyncio.TimeoutError:
                continue

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Ask every replica to finish what it runs and exit, then end the launch."""
        self._stopping = True
        for r in list(self.replicas.values()):
            r.send(wpb.DaemonMessage(shutdown=wpb.Shutdown(drain=True)))
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("workers did not exit within %.0f s; killing them", timeout_s)
        self._fail("the daemon is shutting down")
        await self._kill(proc)

    # ------------------------------------------------------------------ WorkerLink
    async def Connect(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        launch_id = self.launch_id
        # an empty secret never authenticates: before the first launch ours is empty too
        if not hello.secret or not self._secret or not hmac.compare_digest(hello.secret.encode(),
                                                                           self._secret.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong or stale worker secret")
        if hello.replica_id in self.replicas or not 0 <= hello.replica_id < self.num_ranks:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"replica {hello.replica_id} is already connected")
        replica = Replica(hello.replica_id, launch_id, hello)
        self.replicas[hello.replica_id] = replica
        log.info("replica %d connected (rank %d on %s, pid %d, %d KV blocks, max_model_len %d)",
                 hello.replica_id, hello.rank, hello.hostname, hello.pid, hello.num_kv_blocks, hello.max_model_len)
        await context.write(wpb.DaemonMessage(welcome=wpb.Welcome(
            replica_id=hello.replica_id, config_json=json.dumps(self.engine_fields))))
        if len(self.replicas) == self.num_ranks:
            self._all_connected.set()
        reader = asyncio.create_task(self._read(context, replica))
        try:
            while True:
                get = asyncio.ensure_future(replica.outbox.get())
                done, _ = await asyncio.wait([get, reader], return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                msg = get.result()
                await context.write(msg)
                if msg.WhichOneof("kind") == "shutdown":
                    await reader  # the leader finishes, then closes its side
                    break
        finally:
            reader.cancel()

    async def _read(self, context, replica: Replica) -> None:
        reason = f"replica {replica.replica_id} closed its link"
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                if replica.launch_id != self.launch_id or self._failed is None or self._failed.done():
                    continue  # a launch that already failed: drop
                kind = msg.WhichOneof("kind")
                if kind == "step_outputs":
                    try:
                        self.router.on_outputs(replica, msg.step_outputs)
                    except Exception:  # a routing bug must not look like a dead worker: log it, keep going
                        log.exception("routing the outputs of replica %d failed", replica.replica_id)
                elif kind == "load_report":
                    replica.load = msg.load_report
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            reason = f"replica {replica.replica_id} link broke ({type(exc).__name__})"
        if replica.launch_id == self.launch_id and not self._stopping:
            self._fail(reason)

"""Process main of the control daemon (``hpcserve serve``). No torch in this process.

Lifecycle (``serve(config) -> exit code``, one asyncio event loop)::

    start   make the state dir private (0700, umask 077), lock it, open the batch store and recover it (running lines → pending,
            files of closing batches rewritten), resolve the model (the demo is converted once)
            and load its tokenizer
    listen  one grpc.aio server (TLS when [tls] is set): Serving (API keys → tenants),
            WorkerLink, grpc.health.v1, reflection; the OpenAI-compatible HTTP API when
            daemon.http is set (same admission, router and store); endpoint.json (address, the
            key minted for auth.endpoint-tenant, HTTP address, TLS trust root; 0600) written
            once the ports are bound
    run     WorkerPool task (launch, watch, relaunch the MPI worker step), the router's batch
            feeder and the usage flusher (per-tenant usage → the store every few seconds);
            health is SERVING while the workers are ready
    stop    on SIGTERM/SIGINT or an admin's Drain RPC: endpoint marked draining, health NOT_SERVING, new streams refused,
            batch lines aborted and requeued at once (they resume on the next start), chats
            get ``drain_timeout_s`` to finish; then the workers are shut down, pending store
            writes and usage flushed, the endpoint file removed; exit 0. A second signal skips the wait.
            If the worker step cannot be kept alive (``WorkerPool.fatal``) the daemon stops the
            same way and exits 1.

A SIGKILL at any point loses nothing: the batch store is the only durable state, and the
next start recovers it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from dataclasses import asdict

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hpcserve.api.v1 import serving_pb2, serving_pb2_grpc, worker_pb2_grpc
from hpcserve.daemon.state_dir import PRIVATE_UMASK, prepare_state_dir
from hpcserve.daemon.usage import flush as flush_usage
from hpcserve.daemon.usage import run_flusher
from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.daemon")

SERVICE = "hpcserve.api.v1.Serving"
WALLTIME_CHECK_S = 5.0  # --slurm: how often the time left is compared with the drain window


def _public_host(host: str) -> str:
    """An address clients and workers can dial for a listen host ("0.0.0.0" → this node)."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        return socket.gethostname() if os.environ.get("SLURM_JOB_ID") else "127.0.0.1"
    return host


def _allocation_info():
    """A callable giving ``GetServerInfo``'s Allocation (None outside Slurm)."""
    from hpcserve.slurm.env import Allocation, AllocationWatcher

    alloc = Allocation.from_env()
    if alloc is None:
        return None
    watcher = AllocationWatcher(alloc)

    def info():
        end = watcher.end_time()  # squeue at most once a minute
        left = watcher.seconds_left()
        return serving_pb2.Allocation(job_id=alloc.job_id, nodes=alloc.nodes, end_time=int(end or 0),
                                      seconds_left=int(left or 0), num_tasks=alloc.num_tasks or 0,
                                      gpus_per_node=alloc.gpus_per_node or 0)
    return info


def serve(config, slurm: bool = False) -> int:
    """Run the daemon until a signal (exit 0) or an unrecoverable worker failure (exit 1).
    ``slurm``: inside an allocation, launch the workers with srun (``[slurm]`` settings)."""
    daemon = _Daemon(config, slurm)
    # a drain signal during start-up (model loading) must not kill the process (USR1's default):
    # remember it; run() drains as soon as it is serving
    signal.signal(signal.SIGUSR1, lambda *_: daemon.early_drain.append(True))
    return asyncio.run(daemon.run())


class _Daemon:
    def __init__(self, config, slurm: bool = False) -> None:
        self.config = config
        self.use_slurm = slurm
        self.early_drain: list[bool] = []  # SIGUSR1 before the event loop's handler was installed
        self.stop_requested = asyncio.Event()
        self.signals = 0

    async def run(self) -> int:
        from hpcserve.api.admission import Admission
        from hpcserve.api.auth import TenantAuthInterceptor
        from hpcserve.api.batch_api import BatchApi
        from hpcserve.api.servicer import ServingServicer
        from hpcserve.daemon.batch_policy import BatchPolicy
        from hpcserve.daemon.batches import BatchStore
        from hpcserve.daemon.endpoint import write_endpoint
        from hpcserve.daemon.limits import Limiter
        from hpcserve.daemon.loop_lag import LoopLag
        from hpcserve.daemon.router import Router
        from hpcserve.daemon.tenants import Tenants
        from hpcserve.daemon.tls import bind_grpc, load_tls
        from hpcserve.daemon.usage import UsageMeter
        from hpcserve.daemon.usage_store import utc_day
        from hpcserve.daemon.workers import WorkerPool, launcher_command

        cfg = self.config
        state = cfg.daemon.state_path
        os.umask(PRIVATE_UMASK)  # every file the daemon and its workers create is private (0600 / 0700)
        prepare_state_dir(state)
        tls = load_tls(cfg.tls.cert_file, cfg.tls.key_file)
        tenants = Tenants(cfg.tenants, cfg.keys_path)
        store = BatchStore(state)
        store.recover()
        meter = UsageMeter(initial_tokens_today=store.tokens_on(utc_day()))
        limiter = Limiter(cfg.tenants, meter.tokens_today)
        engine_fields = asdict(cfg.engine_config())
        frontend, model_name, model_dir = await asyncio.to_thread(_load_frontend, engine_fields)
        engine_fields["model"] = str(model_dir)  # workers load the resolved directory
        token = tenants.mint_key(cfg.auth.endpoint_tenant) if cfg.auth.endpoint_tenant else None

        router = Router(frontend, store, model_name,
                        batch_watermark=cfg.daemon.batch_watermark or cfg.engine.max_num_seqs,
                        chat_kv_reserve=cfg.daemon.chat_kv_reserve,
                        dedicated_chat_replicas=cfg.daemon.dedicated_chat_replicas,
                        chat_pack_limit=cfg.daemon.chat_pack_limit, meter=meter)
        router.exclude_tenants = limiter.exhausted_tenants  # over the daily quota: their lines wait
        router.cache_salt = tenants.cache_salt  # isolate-prefix-cache: a tenant's own KV-cache namespace
        admission = Admission(router, frontend, tenants, limiter, model_name, cfg.model.path,
                              max_prompt_bytes=cfg.daemon.max_prompt_bytes,
                              max_prompt_tokens=cfg.daemon.max_prompt_tokens)
        batch_policy = BatchPolicy(cfg.slo.batch_completion_windows, cfg.slo.batch_completion_window)
        server = grpc.aio.server(interceptors=[TenantAuthInterceptor(tenants)], options=[
            ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0)])  # a second daemon on the same port must fail, not share it
        host, port = cfg.daemon.host_port
        try:
            bound = bind_grpc(server, host, port, tls)
        except RuntimeError:
            bound = 0
        if not bound:
            raise HpcserveError(f"cannot listen on {cfg.daemon.listen} (in use, or not an address of this "
                                "host); set --listen HOST:PORT, e.g. 127.0.0.1:0 for any free port")
        address = f"{_public_host(host)}:{bound}"
        slurm = cfg.slurm if self.use_slurm else None
        launcher = launcher_command(cfg.daemon.ranks, cfg.daemon.mpiexec_path, slurm)
        pool = WorkerPool(
            num_ranks=cfg.daemon.ranks, launcher=launcher, engine_fields=engine_fields,
            link_address=address, log_dir=state / "logs", restart_limit=cfg.daemon.worker_restart_limit,
            start_timeout_s=cfg.daemon.worker_start_timeout_s, router=router, disagg=_disagg_spec(cfg),
            launch_env=_slurm_env(slurm), tls_ca_pem=tls.cert_pem.decode() if tls else None)
        router.pool = pool
        loop_lag = LoopLag()
        servicer = ServingServicer(
            admission=admission, batch_api=BatchApi(store, batch_policy),
            num_ranks=cfg.daemon.ranks, state_dir=str(state), allocation=_allocation_info(),
            usage=functools.partial(_usage_report, store, meter, limiter, pool, time.monotonic()),
            on_drain=self._on_drain_rpc, loop_lag=loop_lag.max_s)
        serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
        worker_pb2_grpc.add_WorkerLinkServicer_to_server(pool, server)
        health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name, reflection.SERVICE_NAME,
                 health.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        await self._set_health(health_servicer, False)
        await server.start()
        gateway, http_address = None, None
        if cfg.daemon.http:
            from hpcserve.api.openai_http import HttpGateway
            from hpcserve.config_tables import _parse_listen
            from hpcserve.daemon.tls import http_ssl_context

            gateway = HttpGateway(admission, store, batch_policy)
            http_host, http_port = _parse_listen(cfg.daemon.http)
            try:
                http_port = await gateway.start(http_host, http_port, http_ssl_context(tls) if tls else None)
            except HpcserveError:
                await server.stop(None)
                raise
            http_address = f"{_public_host(http_host)}:{http_port}"
        write_endpoint(state, address, token, http=http_address, tls_ca=tls.cert_path if tls else None)
        log.info("hpcserve daemon listening on %s%s (state dir %s); launching %d worker rank(s) with %s",
                 address, f", OpenAI HTTP API on {'https' if tls else 'http'}://{http_address}/v1"
                 if http_address else "", state, cfg.daemon.ranks, " ".join(launcher))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        loop.add_signal_handler(signal.SIGUSR1, self._on_drain_signal)
        if self.early_drain:
            self._on_drain_signal()
        walltime = asyncio.create_task(self._watch_walltime(servicer, router)) if self.use_slurm else None
        pool_task = asyncio.create_task(pool.run())
        feeder = asyncio.create_task(router.run_feeder())
        health_task = asyncio.create_task(self._track_health(health_servicer, router))
        flusher = asyncio.create_task(run_flusher(meter, store))
        lag_task = asyncio.create_task(loop_lag.run())
        stop_wait = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait([pool_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        exit_code = 1 if pool.fatal else 0

        # ---- graceful stop
        if walltime is not None:
            walltime.cancel()
        log.info("stopping: draining in-flight work")
        from hpcserve.daemon.endpoint import mark_draining, remove_endpoint

        mark_draining(state)
        servicer.draining = True
        health_task.cancel()
        await self._set_health(health_servicer, False)
        router.stop_feeding()
        feeder.cancel()
        for inf in list(router.inflight.values()):
            if inf.line is not None:
                router.abort(inf.req_id)  # checkpoint: the line goes back to pending
        drained = await router.drain(0 if self.signals > 1 else cfg.daemon.drain_timeout_s)
        if not drained:
            router.abort_all()
            drained = await router.drain(5.0)
        if not drained:
            router.on_lost("the daemon is shutting down")
        await router.flush_writes()
        await pool.stop()
        pool_task.cancel()
        await asyncio.gather(pool_task, feeder, return_exceptions=True)
        await router.flush_writes()
        flusher.cancel()
        lag_task.cancel()
        await asyncio.gather(flusher, lag_task, return_exceptions=True)
        await flush_usage(meter, store)
        if gateway is not None:
            await gateway.stop()
        await server.stop(grace=1.0)
        remove_endpoint(state)
        admission.close()
        store.close()
        if pool.fatal:
            log.error("%s", pool.fatal)
        log.info("stopped")
        return exit_code

    def _on_drain_rpc(self) -> None:
        log.info("Drain requested by an admin key: draining as on SIGTERM")
        self.signals = max(self.signals, 1)
        self.stop_requested.set()

    def _on_drain_signal(self) -> None:
        log.info("SIGUSR1: the allocation ends soon (sbatch --signal); draining: batch lines go back to "
                 "pending for the next allocation, chats get drain-timeout-s")
        self.signals = max(self.signals, 1)
        self.stop_requested.set()

    async def _watch_walltime(self, servicer, router) -> None:
        """--slurm: drain on our own when the allocation's time left falls below [slurm] drain-s (in case
        the USR1 from ``--signal`` never comes, e.g. a script submitted without it); meanwhile tell the
        router how long until then, so it starts no batch line that could not finish."""
        drain_s = self.config.slurm.drain_s
        drain_at: list[float] = []  # monotonic time of the drain, once the end time is known

        def seconds_to_drain() -> float | None:
            return drain_at[0] - time.monotonic() if drain_at else None

        router.seconds_to_drain = seconds_to_drain
        while True:
            alloc = await asyncio.to_thread(servicer.allocation) if servicer.allocation is not None else None
            if alloc is not None and alloc.end_time:
                drain_at[:] = [time.monotonic() + alloc.seconds_left - drain_s]
            if alloc is not None and alloc.end_time and alloc.seconds_left <= drain_s:
                log.info("%d s left in Slurm job %s (drain window %d s): draining", alloc.seconds_left,
                         alloc.job_id, drain_s)
                self.signals = max(self.signals, 1)
                self.stop_requested.set()
                return
            await asyncio.sleep(WALLTIME_CHECK_S)

    def _on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("signal received: shutting down gracefully (send it again to skip the drain)")
        self.stop_requested.set()

    @staticmethod
    async def _set_health(servicer, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            res = servicer.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    async def _track_health(self, servicer, router) -> None:
        last = None
        while True:
            ready = router.is_ready
            if ready != last:
                await self._set_health(servicer, ready)
                last = ready
            await asyncio.sleep(0.2)


def _load_frontend(engine_fields: dict):
    """Resolve the model (converting the demo GGUF once) and load its tokenizer."""
    from hpcserve.engine.frontend import Frontend
    from hpcserve.models.config import load_model_config
    from hpcserve.models.loader import resolve_model

    model = engine_fields["model"]
    model_dir = resolve_model(model)
    name = "demo" if model == "demo" else os.path.basename(os.path.normpath(str(model)))
    mc = load_model_config(model_dir)
    max_len = min(engine_fields.get("max_model_len") or min(mc.max_position_embeddings, 8192),
                  mc.max_position_embeddings)
    return Frontend.load(model_dir, mc, max_len, name), name, model_dir


def _disagg_spec(cfg) -> dict | None:
    """What the worker ranks need for prefill/decode roles (``HPCSERVE_WORKER_DISAGG``), or None."""
    d = cfg.disagg
    if not d.is_disaggregated:
        return None
    return {"roles": d.role_list, "timeout_s": d.transfer_timeout_s, "checksum": d.kv_checksum,
            "group_bytes": int(d.group_mib * (1 << 20))}


def _slurm_env(slurm) -> dict[str, str]:
    """Environment of an srun worker step: the site's ``[slurm] env`` and the mpi4py ABI choice."""
    if slurm is None:
        return {}
    env = dict(slurm.env_vars)
    if slurm.mpi4py_mpiabi:
        env["MPI4PY_MPIABI"] = slurm.mpi4py_mpiabi
    return env


async def _usage_report(store, meter, limiter, pool, started: float, request,
                        tenant: str | None) -> serving_pb2.UsageReport:
    """``GetUsage``: the store's rows (after flushing the meter) plus live counters; ``tenant`` None =
    every tenant (admin), with the allocation and the economic utilization since this daemon started
    (``daemon/utilization.py``)."""
    from hpcserve.daemon.usage_store import utc_day
    from hpcserve.daemon.utilization import economic_utilization, share

    await flush_usage(meter, store)
    since = request.since_day or None
    live = limiter.snapshot()
    report = serving_pb2.UsageReport()
    if request.by_day:
        rows = await asyncio.to_thread(store.usage, tenant, since)
    else:
        totals = await asyncio.to_thread(store.usage_totals, tenant, since)
        rows = [dict(v, tenant=t, day="") for t, v in sorted(totals.items())]
    names = {r["tenant"] for r in rows}
    today = utc_day()
    for name in sorted(set(live) - names):  # configured tenants with no usage yet
        if tenant is None or name == tenant:
            rows.append({"tenant": name, "day": "" if not request.by_day else today})
    # from here on no await: the meter's values and the allocation are of one instant
    admin = tenant is None
    allocated = pool.num_ranks * (time.monotonic() - started)
    run = meter.snapshot()  # since this daemon started
    for r in rows:
        t = live.get(r["tenant"], {})
        mine = run.get(r["tenant"], {})
        util = share(mine.get("useful_seconds_interactive", 0.0) + mine.get("useful_seconds_batch", 0.0), allocated)
        report.tenants.append(serving_pb2.TenantUsage(
            tenant=r["tenant"], day=r.get("day") or "", requests=int(r.get("requests", 0)),
            input_tokens=int(r.get("input_tokens", 0)), output_tokens=int(r.get("output_tokens", 0)),
            gpu_seconds=float(r.get("gpu_seconds", 0.0)), tokens_today=int(meter.tokens_today(r["tenant"])),
            daily_token_quota=int(t.get("daily_token_quota", 0)), active_streams=int(t.get("active_streams", 0)),
            useful_seconds_interactive=float(r.get("useful_seconds_interactive", 0.0)),
            useful_seconds_batch=float(r.get("useful_seconds_batch", 0.0)),
            economic_utilization=util if admin and not request.by_day else 0.0))
    if admin:  # ranks x daemon uptime, and ranks x step time of the current worker launch
        total = meter.totals()
        report.allocation_gpu_seconds = allocated
        report.busy_gpu_seconds = sum(r.load.busy_time_s for r in pool.replicas.values())
        report.metered_gpu_seconds = total["gpu_seconds"]
        report.useful_seconds_interactive = total["useful_seconds_interactive"]
        report.useful_seconds_batch = total["useful_seconds_batch"]
        for k, v in economic_utilization(total["useful_seconds_interactive"], total["useful_seconds_batch"],
                                         allocated).items():
            setattr(report, k, v)
    return report

"""KV handoff bandwidth vs raw MPI, on 2 ranks (rank 0 sends, rank 1 receives).

    $VENV/bin/mpiexec -n 2 python -m hpcserve.transfer.bench --layers 30 --kv-heads 3 \\
        --head-dim 64 --block-size 16 --tokens 512,2048,8192 --dtype float32

prints one JSON object from rank 0 (SmolLM2-135M geometry above). For every prompt length
N, each repetition measures, alternating which goes first:

- **handoff**: ``MpiConnector`` transfer of a request of N tokens between two paged caches
  with different (by default shuffled) block ids, from ``start_send``/``start_recv`` after a
  barrier until both sides are done (pack + send + recv + unpack), the slower rank's time;
- **raw**: one blocking ``Send``/``Recv`` of the same number of bytes from a pre-allocated,
  pre-touched contiguous buffer between the same ranks, timed the same way.

Medians over ``--reps`` (after ``--warmup`` untimed rounds). Results: per N the latency
(``handoff_ms``), both bandwidths and their ratio; overall ``handoff_gib_s`` and
``mpi_raw_gib_s`` (total bytes / total median time) and ``handoff_ratio``. Every N's
transfer is checked byte for byte (``blocks_digest`` on both ends) unless ``--no-verify``.

Interface: ``run_bench(world, geometry, tokens, **options) -> dict | None`` (the dict on
rank 0), ``main(argv)``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from hpcserve.transfer.base import KVConnectorScheduler, KVGeometry, TransferMeta, TransferState

__all__ = ["main", "run_bench"]

GIB = float(1 << 30)


def _block_ids(rng: random.Random, num_cache_blocks: int, nb: int, order: str) -> list[int]:
    if order == "contiguous":
        start = rng.randrange(1, num_cache_blocks - nb + 1)
        return list(range(start, start + nb))
    return rng.sample(range(1, num_cache_blocks), nb)


def run_bench(
    world,
    geometry: KVGeometry,
    tokens: list[int],
    *,
    reps: int = 5,
    warmup: int = 1,
    layers_per_group: int | None = None,
    group_mib: float = 2.0,
    block_order: str = "shuffled",
    checksum: bool = False,
    num_staging: int = 2,
    recv_depth: int = 3,
    recv_mode: str = "direct",
    verify: bool = True,
    seed: int = 0,
) -> dict | None:
    import torch
    from mpi4py import MPI

    from hpcserve.transfer.mpi import MpiConnector
    from hpcserve.transfer.packing import blocks_digest

    if world.size != 2:
        raise SystemExit(f"run on exactly 2 ranks (got {world.size})")
    comm, rank = world.comm, world.rank
    dtype = getattr(torch, geometry.dtype)
    max_nb = max(geometry.num_blocks_for(n) for n in tokens)
    num_cache_blocks = 2 * max_nb + 1
    shape = (geometry.num_layers, 2, num_cache_blocks, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
    gen = torch.Generator().manual_seed(seed + rank)
    kv = (
        torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        if rank == 0
        else torch.zeros(shape, dtype=dtype)
    )
    sched = KVConnectorScheduler(
        geometry,
        rank=1,
        role="consumer",
        layers_per_group=layers_per_group,
        target_group_bytes=int(group_mib * (1 << 20)),
    )
    conn = MpiConnector(
        world,
        timeout_s=300,
        checksum=checksum,
        num_staging=num_staging,
        recv_depth=recv_depth,
        recv_mode=recv_mode,
    )

    def handoff_once(n: int, rep: int, src_ids, dst_ids) -> tuple[float, TransferMeta, float]:
        meta_d = None
        if rank == 1:  # the decode side builds the meta, as in the planned wiring
            meta_d = sched.build_meta(f"bench-{n}-{rep}", n, src_ids, dst_ids, peer=0).to_dict()
        meta = TransferMeta.from_dict(comm.bcast(meta_d, root=1))
        comm.Barrier()
        t0 = time.perf_counter()
        (conn.start_send if rank == 0 else conn.start_recv)(meta, kv)
        state = conn.wait([meta.req_id], max_sleep=0)[meta.req_id]
        dt = time.perf_counter() - t0
        if state is not TransferState.SUCCESS:
            raise RuntimeError(f"rank {rank}: {meta.req_id} {state.name}: {conn.info(meta.req_id).error}")
        pack_s = conn.info(meta.req_id).pack_s
        conn.done()
        sched.transfer_done(meta.req_id, state)
        return comm.allreduce(dt, op=MPI.MAX), meta, pack_s

    def raw_once(buf) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send([buf, MPI.BYTE], dest=1, tag=7)
        else:
            comm.Recv([buf, MPI.BYTE], source=0, tag=7)
        return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)

    results = []
    for n in tokens:
        nb = geometry.num_blocks_for(n)
        rng = random.Random(seed * 1_000_003 + n)
        src_ids = _block_ids(rng, num_cache_blocks, nb, block_order)
        dst_ids = _block_ids(rng, num_cache_blocks, nb, block_order)
        nbytes = geometry.request_nbytes(n)
        raw_buf = torch.ones(nbytes, dtype=torch.uint8).numpy()  # pre-touched
        t_hand, t_raw, packs = [], [], []
        meta = None
        for rep in range(warmup + reps):
            order = ("raw", "hand") if rep % 2 else ("hand", "raw")
            for what in order:
                if what == "raw":
                    dt = raw_once(raw_buf)
                    if rep >= warmup:
                        t_raw.append(dt)
                else:
                    dt, meta, pack_s = handoff_once(n, rep, src_ids, dst_ids)
                    if rep >= warmup:
                        t_hand.append(dt)
                        packs.append(pack_s)
        ok = None
        if verify:
            ids = meta.src_block_ids if rank == 0 else meta.dst_block_ids
            digests = comm.allgather(blocks_digest(kv, ids, meta.layer_groups))
            ok = digests[0] == digests[1]
        pack_ms = comm.gather(1e3 * statistics.median(packs), root=0)
        del raw_buf
        if rank == 0:
            th, tr = statistics.median(t_hand), statistics.median(t_raw)
            results.append(
                {
                    "tokens": n,
                    "num_blocks": nb,
                    "nbytes": nbytes,
                    "num_groups": meta.num_groups,
                    "handoff_ms": round(1e3 * th, 3),
                    "handoff_best_ms": round(1e3 * min(t_hand), 3),
                    "raw_ms": round(1e3 * tr, 3),
                    "handoff_gib_s": round(nbytes / th / GIB, 3),
                    "mpi_raw_gib_s": round(nbytes / tr / GIB, 3),
                    "handoff_ratio": round(tr / th, 3),
                    "pack_ms": round(pack_ms[0], 3),
                    "unpack_ms": round(pack_ms[1], 3),
                    "verified": ok,
                    "_th": th,
                    "_tr": tr,
                }
            )
    conn.close()
    if rank != 0:
        return None
    total = sum(r["nbytes"] for r in results)
    th = sum(r.pop("_th") for r in results)
    tr = sum(r.pop("_tr") for r in results)
    return {
        "geometry": {
            "num_layers": geometry.num_layers,
            "num_kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "block_size": geometry.block_size,
            "dtype": geometry.dtype,
            "kv_bytes_per_token": geometry.request_nbytes(geometry.block_size) // geometry.block_size,
        },
        "config": {
            "reps": reps,
            "warmup": warmup,
            "layers_per_group": layers_per_group,
            "group_mib": group_mib,
            "block_order": block_order,
            "checksum": checksum,
            "num_staging": num_staging,
            "recv_depth": recv_depth,
            "recv_mode": recv_mode,
            "thread_level": world.thread_level,
        },
        "results": results,
        "handoff_gib_s": round(total / th / GIB, 3),
        "mpi_raw_gib_s": round(total / tr / GIB, 3),
        "handoff_ratio": round(tr / th, 3),
        "verified": all(r["verified"] is not False for r in results),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpcserve.transfer.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", default="512,2048,8192", help="comma-separated prompt lengths")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers-per-group", type=int, default=None, help="default: groups of about --group-mib")
    p.add_argument("--group-mib", type=float, default=2.0)
    p.add_argument("--block-order", choices=["shuffled", "contiguous"], default="shuffled")
    p.add_argument("--checksum", action="store_true", help="in-band per-group digests (debug path)")
    p.add_argument("--staging", type=int, default=2, help="group sends in flight per transfer")
    p.add_argument("--recv-depth", type=int, default=3, help="group receives posted ahead")
    p.add_argument(
        "--recv-mode",
        choices=["direct", "staging"],
        default="direct",
        help="direct: receive into the cache through an MPI datatype; staging: receive, then unpack",
    )
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--thread-level", default="multiple", choices=["single", "funneled", "serialized", "multiple"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from hpcserve.cluster.comm import abort_on_exception, init_mpi

    torch.set_num_threads(args.threads)
    world = init_mpi(required=args.thread_level)
    abort_on_exception(world)
    geo = KVGeometry(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    out = run_bench(
        world,
        geo,
        tokens,
        reps=args.reps,
        warmup=args.warmup,
        layers_per_group=args.layers_per_group,
        group_mib=args.group_mib,
        block_order=args.block_order,
        checksum=args.checksum,
        num_staging=args.staging,
        recv_depth=args.recv_depth,
        recv_mode=args.recv_mode,
        verify=not args.no_verify,
    )
    if out is not None:
        print(json.dumps(out, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

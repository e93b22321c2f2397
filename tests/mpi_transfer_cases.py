"""MpiConnector cases on 2 ranks; run by tests/test_transfer_mpi.py as
``$VENV/bin/mpiexec -n 2 python tests/mpi_transfer_cases.py MODE``. Prints ``RESULT {json}``
lines (one per rank and case) for the test to check.

- ``exact``: fp32 and bf16, direct and staging receives, in-band checksums; 8 concurrent
  requests in both directions at once (partial last blocks, 1 to 2047 tokens). Every
  received block is compared with a regenerated copy of the peer's cache; blocks that
  were not targets must be untouched.
- ``paths``: the buffer paths of :mod:`hpcserve.transfer.device` on CPU tensors, forced
  with ``path=``: ``CudaStagedPath(device="cpu", pin_memory=False)`` (pack into a device
  scratch buffer → copy into a host staging buffer → send; receive → copy → unpack),
  ``CudaAwarePath(device="cpu")`` (MPI is handed the torch tensor itself) and a mixed pair
  (rank 0 default host path with direct receives, rank 1 staged); same 8 concurrent
  requests as ``exact``, in-band checksums, byte comparison, cross-rank digests, and
  counts of the path's calls (staging receives even though ``recv_mode="direct"``).
- ``failures``: wrong ``meta.checksum``; a handshake mismatch; an abort mid-transfer; a
  receive nobody sends (timeout); then a normal transfer on the same connector.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from hpcserve.cluster.comm import abort_on_exception, init_mpi
from hpcserve.transfer.base import KVConnectorScheduler, KVGeometry, TransferState
from hpcserve.transfer.mpi import MpiConnector
from hpcserve.transfer.packing import blocks_digest

LAYERS, BS, HEADS, HEAD_DIM, NB = 6, 16, 2, 32, 400
SEND_BLOCKS, RECV_BLOCKS = range(1, 200), range(200, NB)  # per rank: never both read and written


def original(rank: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn((LAYERS, 2, NB, BS, HEADS, HEAD_DIM), generator=gen).to(dtype)


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def exact(world) -> None:
    import random

    rank = world.rank
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        geo = KVGeometry(LAYERS, HEADS, HEAD_DIM, BS, name)
        for recv_mode in ("direct", "staging"):
            kv = original(rank, dtype)
            conn = MpiConnector(world, checksum=True, timeout_s=30, recv_mode=recv_mode, recv_depth=2)
            # one builder per receiving rank; both ranks build every meta the same way
            builders = {r: KVConnectorScheduler(geo, r, "consumer", target_group_bytes=1 << 20) for r in (0, 1)}
            rng = random.Random(7)
            free_dst = {r: rng.sample(RECV_BLOCKS, len(RECV_BLOCKS)) for r in (0, 1)}
            metas = []
            for i, ntok in enumerate((1, 15, 16, 17, 100, 333, 1000, 2047)):
                dst = i % 2
                nb = -(-ntok // BS)
                src_ids = rng.sample(SEND_BLOCKS, nb)
                dst_ids = [free_dst[dst].pop() for _ in range(nb)]
                metas.append(builders[dst].build_meta(f"{name}-{recv_mode}-{i}", ntok, src_ids, dst_ids, 1 - dst))
            order = metas if rank == 0 else metas[::-1]  # start order must not matter
            for m in order:
                if m.src_rank == rank:
                    conn.start_send(m, kv)
                else:
                    conn.start_recv(m, kv)
            states = conn.wait(timeout_s=60)
            done = dict(conn.done())
            peer = original(1 - rank, dtype)
            mine = original(rank, dtype)
            received = [m for m in metas if m.dst_rank == rank]
            exact_ok = all(torch.equal(peer[:, :, m.src_block_ids], kv[:, :, m.dst_block_ids]) for m in received)
            targets = {b for m in received for b in m.dst_block_ids}
            others = [b for b in range(NB) if b not in targets]
            digests = {
                m.req_id: blocks_digest(kv, m.dst_block_ids if m.dst_rank == rank else m.src_block_ids, m.layer_groups)
                for m in metas
            }
            all_digests = world.comm.allgather(digests)
            emit(
                rank=rank,
                dtype=name,
                recv_mode=recv_mode,
                states={k: v.name for k, v in states.items()},
                done=sorted(k for k, v in done.items() if v.name == "SUCCESS"),
                exact=exact_ok,
                untouched=torch.equal(kv[:, :, others], mine[:, :, others]),
                digests_match=all_digests[0] == all_digests[1],
                num_groups=[m.num_groups for m in metas],
                in_band_digests=all(conn.info(m.req_id).digests[0] is not None for m in metas),
                zombies=conn.num_zombies,
            )
            conn.close()


def _count_calls(path) -> dict:
    counts = dict.fromkeys(("pack", "unpack", "mpi_buffer"), 0)
    for name in counts:
        fn = getattr(path, name)

        def wrapped(*args, _fn=fn, _name=name):
            counts[_name] += 1
            return _fn(*args)

        setattr(path, name, wrapped)
    return counts


def paths(world) -> None:
    import random

    from hpcserve.transfer.device import CudaAwarePath, CudaStagedPath, mpi_cuda_aware

    rank = world.rank
    emit(rank=rank, case="capability", cuda_aware=mpi_cuda_aware())
    for label, dtype in (
        ("staged", torch.float32),
        ("staged", torch.bfloat16),
        ("aware", torch.float32),
        ("mixed", torch.float32),
    ):
        name = str(dtype).removeprefix("torch.")
        geo = KVGeometry(LAYERS, HEADS, HEAD_DIM, BS, name)
        kv = original(rank, dtype)
        if label == "aware":
            path = CudaAwarePath("cpu")
        elif label == "staged" or rank == 1:
            path = CudaStagedPath("cpu", pin_memory=False)
        else:
            path = None  # mixed, rank 0: selected by the connector (CPU cache -> host path)
        counts = _count_calls(path) if path is not None else None
        conn = MpiConnector(world, checksum=True, timeout_s=30, recv_mode="direct", recv_depth=2, path=path)
        builders = {r: KVConnectorScheduler(geo, r, "consumer", target_group_bytes=1 << 20) for r in (0, 1)}
        rng = random.Random(11)
        free_dst = {r: rng.sample(RECV_BLOCKS, len(RECV_BLOCKS)) for r in (0, 1)}
        metas = []
        for i, ntok in enumerate((1, 15, 16, 17, 100, 333, 1000, 2047)):
            dst = i % 2
            nb = -(-ntok // BS)
            src_ids = rng.sample(SEND_BLOCKS, nb)
            dst_ids = [free_dst[dst].pop() for _ in range(nb)]
            metas.append(builders[dst].build_meta(f"{label}-{name}-{i}", ntok, src_ids, dst_ids, 1 - dst))
        for m in metas if rank == 0 else metas[::-1]:
            (conn.start_send if m.src_rank == rank else conn.start_recv)(m, kv)
        states = conn.wait(timeout_s=60)
        done = dict(conn.done())
        peer, mine = original(1 - rank, dtype), original(rank, dtype)
        received = [m for m in metas if m.dst_rank == rank]
        sent = [m for m in metas if m.src_rank == rank]
        targets = {b for m in received for b in m.dst_block_ids}
        others = [b for b in range(NB) if b not in targets]
        digests = {
            m.req_id: blocks_digest(kv, m.dst_block_ids if m.dst_rank == rank else m.src_block_ids, m.layer_groups)
            for m in metas
        }
        all_digests = world.comm.allgather(digests)
        emit(
            rank=rank,
            case=label,
            dtype=name,
            path=conn.path_for(kv).name,
            states=sorted({v.name for v in states.values()}),
            done=sum(v.name == "SUCCESS" for v in done.values()),
            exact=all(torch.equal(peer[:, :, m.src_block_ids], kv[:, :, m.dst_block_ids]) for m in received),
            untouched=torch.equal(kv[:, :, others], mine[:, :, others]),
            digests_match=all_digests[0] == all_digests[1],
            in_band_digests=all(None not in conn.info(m.req_id).digests for m in metas),
            calls=counts,
            groups_sent=sum(m.num_groups for m in sent),
            groups_received=sum(m.num_groups for m in received),
            device_scratch=getattr(path, "device_pool", None) and path.device_pool.num_allocated,
            zombies=conn.num_zombies,
        )
        conn.close()


def failures(world) -> None:
    rank = world.rank
    geo = KVGeometry(LAYERS, HEADS, HEAD_DIM, BS, "float32")
    kv = original(rank, torch.float32)
    conn = MpiConnector(world, timeout_s=1.0, num_staging=1)
    sch = KVConnectorScheduler(geo, 1, "consumer", layers_per_group=1)
    start = conn.start_send if rank == 0 else conn.start_recv
    out = {}

    def finish(req_id, timeout_s=20):
        state = conn.wait([req_id], timeout_s=timeout_s)[req_id]
        x = conn.info(req_id)
        assert (req_id, state) in conn.done()
        out[req_id] = {"state": state.name, "error": x.error, "elapsed": round(x.elapsed_s, 3)}

    # (a) the receiver expects other bytes than the sender has
    m = sch.build_meta("bad-checksum", 200, list(range(1, 14)), list(range(200, 213)), peer=0)
    m.checksum = "00" * 16
    start(m, kv)
    finish(m.req_id)

    # (b) both sides were given different metas for the same transfer
    m = sch.build_meta("mismatch", 200 if rank == 0 else 150, list(range(1, 14)), list(range(200, 213)), peer=0)
    start(m, kv)
    finish(m.req_id)

    # (c) the sender aborts as soon as the transfer runs
    m = sch.build_meta("aborted", 2000, list(range(1, 126)), list(range(200, 325)), peer=0)
    start(m, kv)
    if rank == 0:
        while conn.poll()[m.req_id] is TransferState.BOOTSTRAPPING:
            pass
        conn.abort(m.req_id)
    finish(m.req_id)

    # (d) a receive nobody sends
    m = sch.build_meta("orphan", 32, [1, 2], [200, 201], peer=0)
    if rank == 1:
        t0 = time.monotonic()
        start(m, kv)
        finish(m.req_id)
        out["orphan"]["wall"] = round(time.monotonic() - t0, 3)

    # (e) the same connector still works
    world.comm.Barrier()
    m = sch.build_meta("after", 500, list(range(1, 33)), list(range(300, 332)), peer=0)
    start(m, kv)
    finish(m.req_id)
    peer = original(0, torch.float32)
    if rank == 1:
        out["after"]["exact"] = torch.equal(peer[:, :, m.src_block_ids], kv[:, :, m.dst_block_ids])
    world.comm.Barrier()
    emit(rank=rank, cases=out, zombies=conn.num_zombies)
    conn.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    world = init_mpi()
    abort_on_exception(world)
    {"exact": exact, "paths": paths, "failures": failures}[sys.argv[1]](world)

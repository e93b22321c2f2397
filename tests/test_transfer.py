"""KV handoff connector without MPI: metadata, packing and the loopback backend.

The MPI backend runs under a real ``mpiexec`` in tests/test_transfer_mpi.py.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys

import pytest

from hpcserve.transfer.base import KVConnectorScheduler, KVGeometry, TransferMeta, TransferState, split_layers

torch = pytest.importorskip("torch")

from hpcserve.transfer.loopback import LoopbackChannel, LoopbackConnector
from hpcserve.transfer.packing import BlockMover, StagingPool, blocks_digest, geometry_of, to_runs

L, BS, H, D, NB = 5, 4, 2, 8, 24
S, F = TransferState.SUCCESS, TransferState.FAILED


def geo(dtype="float32", **kw) -> KVGeometry:
    return KVGeometry(kw.get("layers", L), H, D, BS, dtype)


def cache(dtype=torch.float32, seed=0, zero=False, num_blocks=NB):
    shape = (L, 2, num_blocks, BS, H, D)
    if zero:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def moved_equal(src, dst, meta) -> bool:
    return torch.equal(src[:, :, meta.src_block_ids], dst[:, :, meta.dst_block_ids])


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def pair(checksum=False, clock=None, **kw):
    ch = LoopbackChannel()
    extra = {"clock": clock} if clock else {}
    a = LoopbackConnector(ch, 0, checksum=checksum, **extra, **kw)
    b = LoopbackConnector(ch, 1, checksum=checksum, **extra, **kw)
    return ch, a, b


def consumer(**kw) -> KVConnectorScheduler:
    return KVConnectorScheduler(geo(kw.pop("dtype", "float32")), rank=1, role="consumer", **kw)


# --------------------------------------------------------------------- base (no torch)
def test_base_and_package_import_without_torch():
    code = (
        "import sys, hpcserve.transfer, hpcserve.transfer.base; "
        "bad = [m for m in ('torch', 'mpi4py', 'numpy') if m in sys.modules]; assert not bad, bad; print('clean')"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


def test_split_layers_and_geometry():
    assert split_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_layers(3, 10) == [(0, 1), (1, 2), (2, 3)]
    g = KVGeometry(30, 3, 64, 16, "bfloat16")
    assert g.block_nbytes == 16 * 3 * 64 * 2
    assert g.num_blocks_for(17) == 2 and g.request_nbytes(17) == 30 * 2 * 2 * g.block_nbytes
    with pytest.raises(ValueError, match="dtype"):
        KVGeometry(1, 1, 1, 1, "int4")


def test_build_meta_pairs_groups_and_tags():
    sch = consumer(layers_per_group=2)
    meta = sch.build_meta("r1", 9, [7, 3, 5, 11], [9, 2, 6, 1], peer=0)  # 9 tokens -> 3 blocks
    assert (meta.src_rank, meta.dst_rank, meta.num_blocks) == (0, 1, 3)
    assert meta.dst_block_ids == [2, 6, 9] and meta.src_block_ids == [3, 5, 7]  # sorted by destination
    assert meta.layer_groups == [(0, 2), (2, 4), (4, 5)]
    assert meta.group_nbytes == [n * 2 * 3 * BS * H * D * 4 for n in (2, 2, 1)]
    assert sch.build_meta("r2", 1, [4], [8], peer=0).tag == meta.tag + 1

    prod = KVConnectorScheduler(geo(), rank=0, role="producer", target_group_bytes=1)
    m = prod.build_meta("r3", 4, [1], [2], peer=3)
    assert (m.src_rank, m.dst_rank, m.num_groups) == (0, 3, L)  # tiny target: one layer per group
    auto = consumer(min_groups=2).build_meta("r4", 4, [1], [2], peer=0)
    assert auto.layer_groups == [(0, 3), (3, 5)]

    with pytest.raises(ValueError, match="cannot hold"):
        sch.build_meta("x", 9, [1, 2], [3, 4, 5], peer=0)
    with pytest.raises(ValueError, match="duplicate"):
        sch.build_meta("x", 8, [1, 1], [3, 4], peer=0)
    with pytest.raises(ValueError, match="another rank"):
        sch.build_meta("x", 8, [1, 2], [3, 4], peer=1)


def test_meta_is_json_and_pickle_friendly():
    meta = consumer().build_meta("r1", 6, [4, 5], [7, 8], peer=0)
    meta.checksum = "ab" * 16
    again = TransferMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta and pickle.loads(pickle.dumps(meta)) == meta
    assert again.total_nbytes == sum(meta.group_nbytes)


def test_scheduler_side_remote_tokens_and_lifecycle():
    from hpcserve.engine.request import Request, SamplingParams

    sch = consumer()
    req = Request("r1", list(range(10)), SamplingParams())
    assert sch.num_remote_tokens(req) == 0
    sch.add_remote("r1", 10, peer=0)
    assert sch.num_remote_tokens(req) == 9  # one token left to compute for the first logits
    req.output_token_ids.append(42)  # prefill's first sampled token travels with the request
    assert sch.num_remote_tokens(req) == 10
    sch.build_meta("r1", 10, [1, 2, 3], [4, 5, 6], peer=0)
    assert sch.request_finished("r1") is True  # transfer still owns the blocks
    sch.transfer_done("r1", S)
    assert sch.request_finished("r1") is False and sch.num_pending == 0
    assert sch.num_remote_tokens(req) == 0

    prod = KVConnectorScheduler(geo(), rank=0, role="producer")
    meta = sch.build_meta("r2", 4, [1], [2], peer=0)
    prod.add_transfer(TransferMeta.from_dict(meta.to_dict()))  # as the router would hand it over
    assert prod.request_finished("r2") is True
    prod.transfer_done("r2", F)
    assert prod.request_finished("r2") is False


# ------------------------------------------------------------------------- packing
def test_to_runs():
    assert to_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert to_runs([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["shuffled", "contiguous"])
def test_pack_unpack_roundtrip(dtype, order):
    src, dst = cache(dtype), cache(dtype, zero=True)
    rng = random.Random(1)
    if order == "shuffled":
        src_ids, dst_ids = rng.sample(range(1, NB), 6), rng.sample(range(1, NB), 6)
    else:
        src_ids, dst_ids = list(range(2, 8)), list(range(12, 18))
    meta = consumer(dtype=str(dtype).removeprefix("torch."), layers_per_group=2).build_meta(
        "r",
        22,
        src_ids,
        dst_ids,
        peer=0,  # 22 tokens: partial last block (22 = 5 * 4 + 2)
    )
    out = BlockMover(src, meta.src_block_ids, meta.layer_groups)
    inn = BlockMover(dst, meta.dst_block_ids, meta.layer_groups)
    assert (out._runs is None) == (order == "shuffled")
    for g in range(meta.num_groups):
        buf = torch.empty(meta.group_nbytes[g] + 7, dtype=torch.uint8)  # larger buffers are fine
        out.pack(g, buf)
        a, b = meta.layer_groups[g]
        packed = buf[: meta.group_nbytes[g]].view(dtype).view(b - a, 2, len(src_ids), BS, H, D)
        assert torch.equal(packed, src[a:b][:, :, meta.src_block_ids])  # documented buffer layout
        inn.unpack(g, buf)
    assert moved_equal(src, dst, meta)
    untouched = [b for b in range(NB) if b not in meta.dst_block_ids]
    assert not dst[:, :, untouched].any()
    assert blocks_digest(src, meta.src_block_ids, meta.layer_groups) == blocks_digest(
        dst, meta.dst_block_ids, meta.layer_groups
    )
    dst[0, 1, meta.dst_block_ids[-1], -1, 0, 0] += 1  # one element of the unused tail slots
    assert blocks_digest(src, meta.src_block_ids, meta.layer_groups) != blocks_digest(
        dst, meta.dst_block_ids, meta.layer_groups
    )


def test_mover_rejects_bad_input():
    kv = cache()
    assert geometry_of(kv) == geo()
    with pytest.raises(ValueError, match="out of range"):
        BlockMover(kv, [NB], [(0, L)])
    with pytest.raises(ValueError, match="contiguous"):
        BlockMover(kv[:, :, ::2], [1], [(0, L)])
    with pytest.raises(ValueError, match="num_layers, 2"):
        geometry_of(kv[0])
    mover = BlockMover(kv, [1, 2], [(0, L)])
    with pytest.raises(ValueError, match="uint8 buffer"):
        mover.pack(0, torch.empty(10, dtype=torch.uint8))


def test_staging_pool_reuses_buffers():
    pool = StagingPool(align=1024)
    a = pool.acquire(3000)
    assert a.numel() == 3072 and pool.num_allocated == 1
    pool.release(a)
    b = pool.acquire(2500)
    assert b.data_ptr() == a.data_ptr() and pool.num_allocated == 1
    c = pool.acquire(100_000)  # much bigger: new buffer
    pool.release(b)
    pool.release(c)
    assert pool.acquire(1000).data_ptr() == a.data_ptr()  # best fit
    assert pool.acquire(10).numel() == 1024  # free ones are far too big for 10 bytes
    small = StagingPool(max_cached_bytes=4096, align=1024)
    small.release(small.acquire(8192))
    assert small.cached_bytes == 0


# ------------------------------------------------------------------------ loopback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loopback_state_machine_and_bytes(dtype):
    src, dst = cache(dtype, seed=3), cache(dtype, zero=True)
    name = str(dtype).removeprefix("torch.")
    meta = consumer(dtype=name, layers_per_group=2).build_meta("r1", 13, [5, 9, 2, 11], [3, 4, 7, 1], peer=0)
    _, a, b = pair(checksum=True, groups_per_poll=1)
    a.start_send(meta, src)
    assert a.poll() == {"r1": TransferState.BOOTSTRAPPING}  # no READY yet
    assert a.done() == []
    b.start_recv(meta, dst)
    assert b.poll() == {"r1": TransferState.BOOTSTRAPPING}  # nothing sent yet
    assert a.poll() == {"r1": TransferState.TRANSFERRING}  # READY seen, group 0 posted
    assert b.poll() == {"r1": TransferState.TRANSFERRING}  # group 0 unpacked
    assert a.info("r1").nbytes_done == meta.group_nbytes[0] == b.info("r1").nbytes_done
    assert a.poll() == {"r1": TransferState.TRANSFERRING}
    assert a.poll() == {"r1": S}  # third and last group posted
    assert a.done() == [("r1", S)] and a.done() == [] and a.poll() == {}
    assert b.done() == [("r1", S)]
    assert moved_equal(src, dst, meta)
    ia, ib = a.info("r1"), b.info("r1")
    assert ia.digests == ib.digests and all(d is not None and len(d) == 16 for d in ia.digests)
    assert ia.nbytes_done == ib.nbytes_done == meta.total_nbytes and ib.elapsed_s is not None


def test_loopback_checksum_mismatch_is_detected():
    src, dst = cache(), cache(zero=True)
    meta = consumer(layers_per_group=2).build_meta("r1", 16, [1, 2, 3, 4], [5, 6, 7, 8], peer=0)
    ch, a, b = pair(checksum=True)

    def flip_one_byte(m, g, buf):
        if g == 1:
            buf[123] ^= 0x10

    ch.tamper = flip_one_byte
    a.start_send(meta, src)
    b.start_recv(meta, dst)
    a.poll()
    assert b.done() == [("r1", F)]
    assert "checksum mismatch in group 1" in b.info("r1").error
    assert a.done() == [("r1", S)]  # the sender did its part


def test_loopback_expected_checksum_in_meta():
    src = cache()
    sch = consumer(layers_per_group=3)
    for i, tamper in enumerate((False, True)):
        dst = cache(zero=True)
        meta = sch.build_meta(f"r{i}", 12, [1, 2, 3], [5, 6, 7], peer=0)
        meta.checksum = blocks_digest(src, meta.src_block_ids, meta.layer_groups)  # what the producer has
        ch, a, b = pair(checksum=False)  # no in-band digests: only meta.checksum is checked
        if tamper:
            ch.tamper = lambda m, g, buf: buf.__setitem__(0, buf[0] ^ 1)
        a.start_send(meta, src)
        b.start_recv(meta, dst)
        a.poll()
        assert b.done() == [(meta.req_id, F if tamper else S)]
        if tamper:
            assert "differ from meta.checksum" in b.info(meta.req_id).error


def test_loopback_timeout_fails_and_tells_the_peer():
    clock = FakeClock()
    src, dst = cache(), cache(zero=True)
    meta = consumer().build_meta("r1", 8, [1, 2], [3, 4], peer=0)
    _, a, b = pair(clock=clock, timeout_s=5.0)
    a.start_send(meta, src)
    clock.t += 4.9
    assert a.poll() == {"r1": TransferState.BOOTSTRAPPING}
    clock.t += 0.2
    assert a.done() == [("r1", F)]
    assert "timed out after 5 s in BOOTSTRAPPING" in a.info("r1").error
    b.start_recv(meta, dst)  # a late receiver learns at once that the sender gave up
    assert b.done() == [("r1", F)] and "aborted" in b.info("r1").error


def test_loopback_receiver_timeout_and_abort():
    clock = FakeClock()
    src, dst = cache(), cache(zero=True)
    sch = consumer(layers_per_group=1)
    meta = sch.build_meta("r1", 8, [1, 2], [3, 4], peer=0)
    _, a, b = pair(clock=clock, timeout_s=2.0, groups_per_poll=1)
    b.start_recv(meta, dst)
    clock.t += 2.0
    assert b.done() == [("r1", F)]
    a.start_send(meta, src)
    assert a.done() == [("r1", F)]  # READY then ABORT are both in its mailbox

    m2 = sch.build_meta("r2", 8, [1, 2], [3, 4], peer=0)
    a.start_send(m2, src)
    b.start_recv(m2, dst)
    a.poll()
    assert b.poll()["r2"] is TransferState.TRANSFERRING
    a.abort("r2")
    assert a.done() == [("r2", F)] and a.info("r2").error == "aborted"
    assert b.done() == [("r2", F)] and "peer rank 0 aborted: aborted" in b.info("r2").error
    a.abort("r2")  # finished: no-op


def test_loopback_handshake_mismatch_fails_both():
    src, dst = cache(), cache(zero=True)
    meta = consumer().build_meta("r1", 8, [1, 2], [3, 4], peer=0)
    ch = LoopbackChannel()
    a, b = LoopbackConnector(ch, 0, checksum=True), LoopbackConnector(ch, 1, checksum=False)
    a.start_send(meta, src)
    b.start_recv(meta, dst)
    assert a.done() == [("r1", F)] and "handshake mismatch" in a.info("r1").error
    assert b.done() == [("r1", F)]


def test_loopback_concurrent_both_directions():
    caches = {0: cache(seed=10), 1: cache(seed=11)}
    originals = {r: c.clone() for r, c in caches.items()}
    ch = LoopbackChannel()
    conns = {r: LoopbackConnector(ch, r, checksum=True, groups_per_poll=1) for r in (0, 1)}
    # one builder per receiving rank: tags collide across directions, which must not matter
    builders = {r: KVConnectorScheduler(geo(), rank=r, role="consumer", layers_per_group=2) for r in (0, 1)}
    rng = random.Random(5)
    free_dst = {r: rng.sample(range(12, NB), 12) for r in (0, 1)}  # blocks 12.. receive, 1..11 send
    metas = []
    for i in range(6):
        dst_rank = i % 2
        nt = rng.randint(1, 8)
        nb = -(-nt // BS)
        src_ids = rng.sample(range(1, 12), nb)
        dst_ids = [free_dst[dst_rank].pop() for _ in range(nb)]
        metas.append(builders[dst_rank].build_meta(f"q{i}", nt, src_ids, dst_ids, peer=1 - dst_rank))
    assert len({m.tag for m in metas}) < len(metas)  # there are equal tags in both directions
    for m in metas:
        conns[m.src_rank].start_send(m, caches[m.src_rank])
        conns[m.dst_rank].start_recv(m, caches[m.dst_rank])
    for _ in range(20):
        for c in conns.values():
            c.poll()
    results = {r: dict(c.done()) for r, c in conns.items()}
    for m in metas:
        assert results[m.src_rank][m.req_id] is S and results[m.dst_rank][m.req_id] is S
        assert torch.equal(originals[m.src_rank][:, :, m.src_block_ids], caches[m.dst_rank][:, :, m.dst_block_ids])


def test_loopback_rejects_misuse():
    src = cache()
    sch = consumer()
    meta = sch.build_meta("r1", 8, [1, 2], [3, 4], peer=0)
    _, a, b = pair()
    with pytest.raises(ValueError, match="start_send on rank 1"):
        b.start_send(meta, src)
    with pytest.raises(ValueError, match="start_recv on rank 0"):
        a.start_recv(meta, src)
    a.start_send(meta, src)
    with pytest.raises(ValueError, match="already started"):
        a.start_send(meta, src)
    other = KVConnectorScheduler(KVGeometry(L, H, D * 2, BS), rank=1, role="consumer").build_meta(
        "r2", 8, [1, 2], [3, 4], peer=0
    )
    with pytest.raises(ValueError, match="group sizes"):
        a.start_send(other, src)
    assert a.num_active == 1  # the failed start left nothing behind
    with pytest.raises(KeyError):
        a.info("nope")

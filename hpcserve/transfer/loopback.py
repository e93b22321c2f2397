"""In-process KV connector backend, for tests: endpoints (one per "rank", each with its own
cache) exchange packed groups through a shared :class:`LoopbackChannel` of mailboxes.

It speaks the same protocol as :mod:`hpcserve.transfer.mpi`, with Python objects for
messages instead of raw buffers::

    receiver  start_recv ── READY {num_blocks, group_nbytes, checksum} ──►  sender (BOOTSTRAPPING)
    sender    TRANSFERRING: pack group g, post ("group", g, buf, digest)  ──►  receiver
    receiver  TRANSFERRING on the first group: verify digest, unpack into dst block ids
    either    abort / timeout / error ── ABORT {reason} ──► peer (it fails too)

Interface: ``channel = LoopbackChannel(); a = LoopbackConnector(channel, rank=0);
b = LoopbackConnector(channel, rank=1)``; then the :class:`KVConnectorWorker` API.
``groups_per_poll`` limits the groups a sender posts per ``poll()`` (tests of the
intermediate states); ``channel.tamper(meta, g, buf)`` may corrupt a group in flight
(tests of the checksum path). Mailboxes are keyed by (src_rank, dst_rank, tag,
direction), so concurrent transfers, in both directions, never see each other's messages.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpcserve.transfer.base import KVConnectorWorker, Transfer, TransferError, TransferMeta, TransferState
from hpcserve.transfer.packing import BlockMover, StagingPool, check_meta, combine_digests, digest

__all__ = ["LoopbackChannel", "LoopbackConnector"]

_TO_DST, _TO_SRC = "to_dst", "to_src"


class LoopbackChannel:
    """Mailboxes shared by the loopback endpoints of one process."""

    def __init__(self) -> None:
        self._boxes: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.tamper: Callable[[TransferMeta, int, torch.Tensor], None] | None = None

    @staticmethod
    def key(meta: TransferMeta, direction: str) -> tuple:
        return (meta.src_rank, meta.dst_rank, meta.tag, direction)

    def put(self, key: tuple, msg: tuple) -> None:
        self._boxes[key].append(msg)

    def take(self, key: tuple) -> tuple | None:
        box = self._boxes.get(key)
        if not box:
            return None
        msg = box.popleft()
        if not box:
            del self._boxes[key]
        return msg

    def clear(self, key: tuple) -> None:
        self._boxes.pop(key, None)

    @property
    def num_messages(self) -> int:
        return sum(len(b) for b in self._boxes.values())


@dataclass
class _Ctx:
    mover: BlockMover
    next_group: int = 0  # sender: next group to post; receiver: groups unpacked
    ready: bool = False


class LoopbackConnector(KVConnectorWorker):
    def __init__(
        self,
        channel: LoopbackChannel,
        rank: int,
        *,
        groups_per_poll: int | None = None,
        pool: StagingPool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(rank, **kwargs)
        self.channel = channel
        self.groups_per_poll = groups_per_poll
        self.pool = pool or StagingPool()

    # -- helpers
    def _inbox(self, x: Transfer) -> tuple:
        return self.channel.key(x.meta, _TO_SRC if x.is_send else _TO_DST)

    def _outbox(self, x: Transfer) -> tuple:
        return self.channel.key(x.meta, _TO_DST if x.is_send else _TO_SRC)

    def _want_digests(self, x: Transfer) -> bool:
        return self.checksum or (not x.is_send and x.meta.checksum is not None)

    # -- backend hooks
    def _begin(self, x: Transfer, kv_cache) -> None:
        check_meta(x.meta, kv_cache)
        ids = x.meta.src_block_ids if x.is_send else x.meta.dst_block_ids
        x.ctx = _Ctx(mover=BlockMover(kv_cache, ids, x.meta.layer_groups))
        if not x.is_send:
            ready = {
                "num_blocks": x.meta.num_blocks,
                "group_nbytes": list(x.meta.group_nbytes),
                "checksum": self.checksum,
            }
            self.channel.put(self._outbox(x), ("ready", ready))

    def _progress(self, x: Transfer) -> None:
        ctx: _Ctx = x.ctx
        while (msg := self.channel.take(self._inbox(x))) is not None:
            if msg[0] == "abort":
                raise TransferError(f"peer rank {x.peer} aborted: {msg[1]}")
            if x.is_send and msg[0] == "ready":
                self._check_ready(x, msg[1])
                ctx.ready = True
                x.state = TransferState.TRANSFERRING
            elif not x.is_send and msg[0] == "group":
                self._recv_group(x, *msg[1:])
            else:
                raise TransferError(f"unexpected message {msg[0]!r}")
        if x.is_send and ctx.ready:
            self._send_groups(x)

    def _check_ready(self, x: Transfer, ready: dict) -> None:
        mine = {"num_blocks": x.meta.num_blocks, "group_nbytes": list(x.meta.group_nbytes), "checksum": self.checksum}
        if ready != mine:
            raise TransferError(f"handshake mismatch: receiver has {ready}, sender has {mine}")

    def _send_groups(self, x: Transfer) -> None:
        ctx: _Ctx = x.ctx
        limit = self.groups_per_poll or x.meta.num_groups
        for _ in range(limit):
            g = ctx.next_group
            if g >= x.meta.num_groups:
                break
            n = x.meta.group_nbytes[g]
            buf = self.pool.acquire(n)
            t0 = time.perf_counter()
            ctx.mover.pack(g, buf)
            x.pack_s += time.perf_counter() - t0
            d = digest(buf[:n]) if self.checksum else None
            x.digests[g] = d
            # the buffer changes hands: the receiver owns it from now on
            self.channel.put(self._outbox(x), ("group", g, buf, d))
            ctx.next_group += 1
            x.nbytes_done += n
        if ctx.next_group == x.meta.num_groups:
            self._succeed(x)

    def _recv_group(self, x: Transfer, g: int, buf: torch.Tensor, sent_digest: bytes | None) -> None:
        ctx: _Ctx = x.ctx
        n = x.meta.group_nbytes[g]
        x.state = TransferState.TRANSFERRING
        if self.channel.tamper is not None:
            self.channel.tamper(x.meta, g, buf[:n])
        if self._want_digests(x):
            x.digests[g] = digest(buf[:n])
            if sent_digest is not None and sent_digest != x.digests[g]:
                raise TransferError(f"checksum mismatch in group {g} (layers {x.meta.layer_groups[g]})")
        t0 = time.perf_counter()
        ctx.mover.unpack(g, buf)
        x.pack_s += time.perf_counter() - t0
        self.pool.release(buf)
        ctx.next_group += 1
        x.nbytes_done += n
        if ctx.next_group == x.meta.num_groups:
            if x.meta.checksum is not None and combine_digests(x.digests) != x.meta.checksum:
                raise TransferError("checksum mismatch: received blocks differ from meta.checksum")
            self._succeed(x)

    def _cancel(self, x: Transfer, notify_peer: bool) -> None:
        self.channel.clear(self._inbox(x))
        if notify_peer:
            self.channel.put(self._outbox(x), ("abort", x.error))
        x.ctx = None

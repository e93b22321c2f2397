"""KV-cache handoff connector contract (disaggregated prefill → decode). No torch here.

A *transfer* moves the KV of one request's first ``num_tokens`` tokens from the paged
cache of a prefill rank (``src_rank``, the producer) into other block ids of the paged
cache of a decode rank (``dst_rank``, the consumer). Like vLLM v1's ``KVConnector``, one
connector has two roles, used by different parts of the engine:

Scheduler side (:class:`KVConnectorScheduler`; ids and counts only, no torch)::

    add_remote(req_id, num_tokens, peer)     consumer: this request's KV will arrive from peer
    num_remote_tokens(req) -> int            tokens whose KV will arrive (not to be computed here)
    build_meta(req_id, num_tokens, src_block_ids, dst_block_ids, peer) -> TransferMeta
    add_transfer(meta)                       register a meta built by the other side's scheduler
    request_finished(req_id) -> bool         True: keep the request's blocks, a transfer still reads/writes them
    transfer_done(req_id, state)             feed back what the worker side's done() reported

Worker side (:class:`KVConnectorWorker`; backends :mod:`~hpcserve.transfer.mpi` and
:mod:`~hpcserve.transfer.loopback`; they move torch tensors)::

    start_send(meta, kv_cache)               producer: pack meta.src_block_ids, send them to meta.dst_rank
    start_recv(meta, kv_cache)               consumer: receive into meta.dst_block_ids from meta.src_rank
    poll() -> {req_id: TransferState}        make progress (non-blocking); states of unreported transfers
    done() -> [(req_id, TransferState)]      poll(), then the transfers finished since the last call:
                                             from then on their blocks may be freed / reused
    abort(req_id)                            FAILED now; the peer is told (it fails too)
    info(req_id) -> Transfer                 state, error, bytes, timings, per-group digests
    wait(req_ids=None, timeout_s=None)       poll with backoff until those transfers finish (tests, bench)
    close()                                  abort everything left; free the communicator

``kv_cache`` is the model runner's paged KV tensor ``[num_layers, 2, num_blocks, block_size,
kv_heads, head_dim]`` (``ModelRunner.kv_cache``), C-contiguous, any dtype (moved as raw bytes).

Lifecycle of one transfer (per side, polled)::

    start_*  ─►  BOOTSTRAPPING  ──handshake──►  TRANSFERRING  ──all groups──►  SUCCESS
                      │                              │
                      └── timeout_s / abort / peer ABORT / checksum mismatch / MPI error ──►  FAILED

- Sender: BOOTSTRAPPING until the receiver's READY header arrives (it names the transfer,
  the block count, group sizes and whether checksums are on; a mismatch fails both sides).
  SUCCESS once every group has left its staging buffer: the source blocks may be freed.
- Receiver: BOOTSTRAPPING until the first group lands, SUCCESS once every group is in
  ``dst_block_ids`` (and, with ``checksum=True``, every group's digest matched).
- ``timeout_s`` counts from ``start_*``: a transfer not finished by then becomes FAILED
  (this is how a dead peer shows up when the launcher does not kill the world).
- After FAILED the destination blocks hold garbage (recompute). ``done()`` reports a
  transfer only once nothing can write into its blocks any more: a receive that MPI
  still owns (MPI backend, direct mode) keeps a FAILED transfer out of ``done()`` until
  its cancel completes. Staging buffers MPI still owns are kept (never reused) until it
  lets go.

Flow (planned daemon wiring, issue #5 part 2): the prefill replica computes the prompt and
keeps its blocks (``request_finished`` → True); the router hands ``src_block_ids`` to the
decode replica, whose scheduler side allocates destination blocks and calls
``build_meta`` once; the same (JSON) meta goes to both worker sides (and to the prefill
scheduler side's ``add_transfer``). One builder per
receiving (or per sending) rank keeps ``meta.tag`` unique per rank pair, which is all the
MPI backend needs to keep concurrent transfers apart.

Layer groups: the blocks of a request are moved as one contiguous buffer per group of
consecutive layers (K and V of each layer in the group), so a transfer is a few large
messages and packing group g+1 overlaps the transfer of group g.
"""

from __future__ import annotations

import abc
import collections
import enum
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcserve.transfer.geometry import DTYPE_SIZES, KVGeometry, split_layers

__all__ = [
    "DTYPE_SIZES",
    "MAX_GROUPS",
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "KVGeometry",
    "Transfer",
    "TransferError",
    "TransferMeta",
    "TransferState",
    "split_layers",
]

MAX_GROUPS = 254  # per transfer; the MPI backend reserves 256 tags per transfer slot


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class TransferError(RuntimeError):
    """A transfer failed for a reason worth a message (peer abort, bad handshake, checksum)."""


@dataclass
class TransferMeta:
    """Everything both sides need to agree on for one transfer. Plain data: ``to_dict`` is
    JSON-able, pickling works.

    - ``src_block_ids[i]`` (on ``src_rank``) is copied to ``dst_block_ids[i]`` (on
      ``dst_rank``); ``build_meta`` lists the pairs by ascending destination id, which is
      also the order of blocks inside each group buffer (not token order: whole blocks move,
      so the slots after ``num_tokens`` in the last block travel too).
    - ``layer_groups[g] = (start, stop)``: those layers (K and V) travel as message g of
      ``group_nbytes[g]`` bytes."""

    req_id: str
    src_rank: int
    dst_rank: int
    num_tokens: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
    layer_groups: list[tuple[int, int]]
    group_nbytes: list[int]
    tag: int  # unique per (src_rank, dst_rank) among concurrent transfers; MPI tags derive from it
    checksum: str | None = None  # optional expected blocks_digest(), hex; the receiver checks it if set

    @property
    def num_blocks(self) -> int:
        return len(self.src_block_ids)

    @property
    def num_groups(self) -> int:
        return len(self.layer_groups)

    @property
    def total_nbytes(self) -> int:
        return sum(self.group_nbytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_groups"] = [list(g) for g in self.layer_groups]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransferMeta:
        d = dict(d)
        d["layer_groups"] = [tuple(g) for g in d["layer_groups"]]
        return cls(**d)


# ----------------------------------------------------------------- scheduler side
def _second(pair: tuple[int, int]) -> int:
    return pair[1]


class KVConnectorScheduler:
    """Scheduler side: decides what is remote and builds :class:`TransferMeta`. No torch.

    ``role`` is ``"producer"`` (prefill: sends) or ``"consumer"`` (decode: receives).
    Layer groups: ``layers_per_group`` if given, else as many groups as needed for messages
    of about ``target_group_bytes`` (at least ``min(min_groups, num_layers)``, so even a
    short prompt is pipelined; at most ``num_layers``)."""

    def __init__(
        self,
        geometry: KVGeometry,
        rank: int,
        role: str,
        *,
        layers_per_group: int | None = None,
        target_group_bytes: int = 2 << 20,
        min_groups: int = 4,
    ) -> None:
        if role not in ("producer", "consumer"):
            raise ValueError(f"role must be 'producer' or 'consumer', got {role!r}")
        if layers_per_group is not None and layers_per_group < 1:
            raise ValueError(f"layers_per_group must be >= 1, got {layers_per_group!r}")
        self.geometry = geometry
        self.rank = rank
        self.role = role
        self.layers_per_group = layers_per_group
        self.target_group_bytes = target_group_bytes
        self.min_groups = min_groups
        self._remote: dict[str, tuple[int, int]] = {}  # consumer: req_id -> (num_tokens, peer)
        self._pending: dict[str, TransferMeta] = {}  # built, not yet reported done
        self._next_tag = 0

    # -- what is remote
    def add_remote(self, req_id: str, num_tokens: int, peer: int) -> None:
        """Consumer: the KV of ``req_id``'s first ``num_tokens`` tokens will come from ``peer``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        self._remote[req_id] = (num_tokens, peer)

    def num_remote_tokens(self, req) -> int:
        """Tokens of ``req`` (anything with ``req_id`` and ``num_tokens``) whose KV arrives by
        transfer instead of being computed here. At least one token is always left to
        compute, so the first local step produces logits (as ``find_cached_prefix`` does)."""
        entry = self._remote.get(req.req_id)
        if entry is None:
            return 0
        return max(0, min(entry[0], req.num_tokens - 1))

    # -- metadata
    def layer_groups_for(self, num_tokens: int) -> list[tuple[int, int]]:
        g = self.geometry
        if self.layers_per_group is not None:
            step = self.layers_per_group
            groups = [(s, min(s + step, g.num_layers)) for s in range(0, g.num_layers, step)]
        else:
            total = g.request_nbytes(num_tokens)
            n = max(math.ceil(total / max(1, self.target_group_bytes)), min(self.min_groups, g.num_layers))
            groups = split_layers(g.num_layers, n)
        if len(groups) > MAX_GROUPS:
            groups = split_layers(g.num_layers, MAX_GROUPS)
        return groups

    def build_meta(
        self, req_id: str, num_tokens: int, src_block_ids: list[int], dst_block_ids: list[int], peer: int
    ) -> TransferMeta:
        """The transfer of ``req_id``'s first ``num_tokens`` tokens between this rank and
        ``peer`` (direction from ``role``). Both block lists (in token order) must cover the
        tokens; their first ``ceil(num_tokens / block_size)`` ids are paired position by
        position, and the pairs are stored sorted by destination id (the wire order)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if peer == self.rank:
            raise ValueError(f"peer must be another rank, got {peer} == own rank")
        nb = self.geometry.num_blocks_for(num_tokens)
        for name, ids in (("src_block_ids", src_block_ids), ("dst_block_ids", dst_block_ids)):
            if len(ids) < nb:
                raise ValueError(f"{name}: {len(ids)} blocks cannot hold {num_tokens} tokens (need {nb})")
            if len(set(ids[:nb])) != nb:
                raise ValueError(f"{name}: duplicate block ids")
        groups = self.layer_groups_for(num_tokens)
        per_layer = 2 * nb * self.geometry.block_nbytes
        src, dst = (self.rank, peer) if self.role == "producer" else (peer, self.rank)
        # wire order: ascending destination id, so the receiver writes long ascending runs
        pairs = sorted(zip((int(b) for b in src_block_ids[:nb]), (int(b) for b in dst_block_ids[:nb])), key=_second)
        meta = TransferMeta(
            req_id=req_id,
            src_rank=src,
            dst_rank=dst,
            num_tokens=num_tokens,
            src_block_ids=[s for s, _ in pairs],
            dst_block_ids=[d for _, d in pairs],
            layer_groups=groups,
            group_nbytes=[(b - a) * per_layer for a, b in groups],
            tag=self._next_tag,
        )
        self._next_tag = (self._next_tag + 1) % (1 << 30)
        self._pending[req_id] = meta
        return meta

    def add_transfer(self, meta: TransferMeta) -> None:
        """Track a transfer whose meta was built elsewhere (the producer, when the consumer
        built it), so :meth:`request_finished` keeps its blocks until it is done."""
        self._pending[meta.req_id] = meta

    # -- lifecycle
    def request_finished(self, req_id: str) -> bool:
        """The engine finished (or aborted) ``req_id``. True: a transfer still uses its
        blocks, free them only after :meth:`transfer_done`."""
        self._remote.pop(req_id, None)
        return req_id in self._pending

    def transfer_done(self, req_id: str, state: TransferState) -> None:
        self._pending.pop(req_id, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)


# -------------------------------------------------------------------- worker side
@dataclass(eq=False)
class Transfer:
    """One side of one transfer, as the worker side tracks it (``info(req_id)``)."""

    meta: TransferMeta
    is_send: bool
    started_s: float
    deadline_s: float
    state: TransferState = TransferState.BOOTSTRAPPING
    finished_s: float | None = None
    error: str | None = None
    nbytes_done: int = 0
    digests: list[bytes | None] = field(default_factory=list)  # per group, when checksums are on
    pack_s: float = 0.0  # time spent packing / unpacking (copy work on this side)
    ctx: Any = None  # backend state

    @property
    def req_id(self) -> str:
        return self.meta.req_id

    @property
    def peer(self) -> int:
        return self.meta.dst_rank if self.is_send else self.meta.src_rank

    @property
    def elapsed_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.started_s


class KVConnectorWorker(abc.ABC):
    """Worker side: bookkeeping, timeouts and the state machine shared by the backends.
    Backends implement ``_begin`` (post first messages), ``_progress`` (non-blocking step;
    raise to fail, call ``_succeed``) and ``_cancel`` (drop in-flight work, maybe tell the
    peer). Not thread-safe: drive one connector from one thread."""

    def __init__(
        self, rank: int, *, timeout_s: float = 60.0, checksum: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.rank = rank
        self.timeout_s = timeout_s
        self.checksum = checksum
        self.clock = clock
        self._active: dict[str, Transfer] = {}
        self._finished: dict[str, Transfer] = {}  # finished, not yet returned by done()
        self._draining: dict[str, Transfer] = {}  # FAILED, not reported until MPI lets go of the cache
        self._history: collections.OrderedDict[str, Transfer] = collections.OrderedDict()

    # -- public API
    def start_send(self, meta: TransferMeta, kv_cache) -> None:
        if meta.src_rank != self.rank:
            raise ValueError(f"start_send on rank {self.rank} for a transfer from rank {meta.src_rank}")
        self._start(meta, kv_cache, is_send=True)

    def start_recv(self, meta: TransferMeta, kv_cache) -> None:
        if meta.dst_rank != self.rank:
            raise ValueError(f"start_recv on rank {self.rank} for a transfer to rank {meta.dst_rank}")
        self._start(meta, kv_cache, is_send=False)

    def poll(self) -> dict[str, TransferState]:
        self._reap()
        self._drain()
        for x in list(self._active.values()):
            try:
                self._progress(x)
            except Exception as e:  # noqa: BLE001 - any backend error fails this transfer only
                self._fail(x, e if isinstance(e, TransferError) else f"{type(e).__name__}: {e}", notify_peer=True)
                continue
            if not x.state.is_finished and self.clock() >= x.deadline_s:
                self._fail(x, f"timed out after {self.timeout_s:g} s in {x.state.name}", notify_peer=True)
        out = {rid: x.state for rid, x in self._finished.items()}
        out.update((rid, x.state) for rid, x in self._draining.items())
        out.update((rid, x.state) for rid, x in self._active.items())
        return out

    def done(self) -> list[tuple[str, TransferState]]:
        self.poll()
        out = [(rid, x.state) for rid, x in self._finished.items()]
        self._finished.clear()
        return out

    def abort(self, req_id: str) -> None:
        x = self._active.get(req_id)
        if x is not None:
            self._fail(x, "aborted", notify_peer=True)

    def info(self, req_id: str) -> Transfer:
        x = (
            self._active.get(req_id)
            or self._finished.get(req_id)
            or self._draining.get(req_id)
            or self._history.get(req_id)
        )
        if x is None:
            raise KeyError(req_id)
        return x

    def wait(
        self, req_ids=None, timeout_s: float | None = None, min_sleep: float = 0.0, max_sleep: float = 2e-3
    ) -> dict[str, TransferState]:
        """Poll until the given (default: all active) transfers are finished, sleeping between
        polls with exponential backoff from ``min_sleep`` to ``max_sleep`` (``max_sleep=0``
        spins). Returns their final states (they are still reported once by ``done()``)."""
        ids = list(self._active) if req_ids is None else list(req_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sleep = min_sleep
        while True:
            states = self.poll()
            if all(states.get(r, self.info(r).state).is_finished for r in ids):
                return {r: self.info(r).state for r in ids}
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"transfers {ids} not finished after {timeout_s:g} s")
            if sleep > 0:
                time.sleep(sleep)
            sleep = min(sleep * 2 if sleep else 1e-5, max_sleep)

    def close(self) -> None:
        for x in list(self._active.values()):
            self._fail(x, "connector closed", notify_peer=True)

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- shared machinery
    def _start(self, meta: TransferMeta, kv_cache, is_send: bool) -> None:
        if meta.req_id in self._active or meta.req_id in self._finished or meta.req_id in self._draining:
            raise ValueError(f"transfer for {meta.req_id!r} already started on rank {self.rank}")
        if meta.src_rank == meta.dst_rank:
            raise ValueError("src_rank and dst_rank must differ")
        if not 1 <= meta.num_groups <= MAX_GROUPS or len(meta.group_nbytes) != meta.num_groups:
            raise ValueError(f"bad layer groups: {meta.num_groups} groups, {len(meta.group_nbytes)} sizes")
        if len(meta.dst_block_ids) != len(meta.src_block_ids):
            raise ValueError("src_block_ids and dst_block_ids differ in length")
        now = self.clock()
        x = Transfer(meta=meta, is_send=is_send, started_s=now, deadline_s=now + self.timeout_s)
        x.digests = [None] * meta.num_groups
        self._active[meta.req_id] = x
        try:
            self._begin(x, kv_cache)
        except Exception:
            del self._active[meta.req_id]
            raise

    def _succeed(self, x: Transfer) -> None:
        self._finish(x, TransferState.SUCCESS)

    def _fail(self, x: Transfer, error, notify_peer: bool) -> None:
        if x.state.is_finished:
            return
        x.error = str(error)
        try:
            self._cancel(x, notify_peer=notify_peer)
        finally:
            self._finish(x, TransferState.FAILED)

    def _finish(self, x: Transfer, state: TransferState) -> None:
        x.state = state
        x.finished_s = self.clock()
        self._active.pop(x.req_id, None)
        if self._holds_cache(x):
            self._draining[x.req_id] = x  # FAILED, but the cache may still be written
        else:
            self._finished[x.req_id] = x
        self._history[x.req_id] = x
        while len(self._history) > 1024:
            self._history.popitem(last=False)

    def _drain(self) -> None:
        for rid, x in list(self._draining.items()):
            if not self._holds_cache(x):
                del self._draining[rid]
                self._finished[rid] = x

    def _reap(self) -> None:
        """Backend hook: release resources of finished transfers that MPI still held."""

    def _holds_cache(self, x: Transfer) -> bool:
        """Backend hook: True while a finished transfer's pending operations may still
        write into the KV cache (its blocks must not be reused yet)."""
        return False

    @abc.abstractmethod
    def _begin(self, x: Transfer, kv_cache) -> None: ...

    @abc.abstractmethod
    def _progress(self, x: Transfer) -> None: ...

    @abc.abstractmethod
    def _cancel(self, x: Transfer, notify_peer: bool) -> None: ...

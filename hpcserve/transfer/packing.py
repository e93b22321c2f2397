"""Pack a request's blocks of the paged KV cache into one contiguous buffer per layer group
and unpack them into other block ids (torch side of the KV handoff).

The cache is ``ModelRunner.kv_cache``: ``[num_layers, 2, num_blocks, block_size, kv_heads,
head_dim]``, C-contiguous, any dtype, on any device (buffers must be on the cache's device;
:mod:`hpcserve.transfer.device` decides where staging buffers live). The buffer of group
``g`` (layers ``[l0, l1)``) is::

    [l1 - l0, 2 (K, V), len(block_ids), block_size, kv_heads, head_dim]   (cache dtype, C order)

i.e. for every (layer, K/V) row the request's blocks back to back, in ``block_ids`` order.
Whole blocks are copied (a partial last block travels with its unused slots). Data is moved
as raw bytes through a wide integer view (int64 when the block row allows it), so fp32,
bf16 and fp16 take the same path, bit-exact.

Interface::

    mover = BlockMover(kv_cache, block_ids, layer_groups)   # one per transfer side
    mover.pack(g, buf)       # buf: uint8 tensor, >= mover.group_nbytes[g] bytes
    mover.unpack(g, buf)     # inverse, into this mover's block ids
    digest(buf[:n]) -> bytes                                 # blake2b-128 of raw bytes
    blocks_digest(kv_cache, block_ids, layer_groups) -> str  # hex, same on both ends iff same bytes
    pool = StagingPool(device=None, pin_memory=False); buf = pool.acquire(n); ...; pool.release(buf)

Copies use ``index_select(out=)`` / ``index_copy_`` over ``[rows, num_blocks, row_elems]``
views; when the ids form few runs of consecutive blocks (fresh allocations usually do),
one strided ``copy_`` per run is used instead. Staging buffers come from a pool so
steady-state transfers never page-fault on fresh memory.
"""

from __future__ import annotations

import bisect
import hashlib

import torch

from hpcserve.transfer.base import KVGeometry, TransferMeta

__all__ = [
    "BlockMover",
    "StagingPool",
    "blocks_digest",
    "check_meta",
    "combine_digests",
    "digest",
    "geometry_of",
    "to_runs",
]

_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
}


def geometry_of(kv_cache: torch.Tensor) -> KVGeometry:
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"kv_cache must be [num_layers, 2, num_blocks, block_size, kv_heads, head_dim], got {tuple(kv_cache.shape)}"
        )
    name = _TORCH_DTYPES.get(kv_cache.dtype)
    if name is None:
        raise ValueError(f"unsupported kv_cache dtype {kv_cache.dtype}")
    L, _, _, bs, h, d = kv_cache.shape
    return KVGeometry(num_layers=L, num_kv_heads=h, head_dim=d, block_size=bs, dtype=name)


def check_meta(meta: TransferMeta, kv_cache: torch.Tensor) -> None:
    """Raise ValueError if ``meta`` does not describe a transfer of this cache's geometry."""
    geo = geometry_of(kv_cache)
    nb = geo.num_blocks_for(meta.num_tokens)
    if meta.num_blocks != nb:
        raise ValueError(f"{meta.req_id}: {meta.num_blocks} blocks for {meta.num_tokens} tokens, expected {nb}")
    covered = [layer for a, b in meta.layer_groups for layer in range(a, b)]
    if covered != list(range(geo.num_layers)):
        raise ValueError(f"{meta.req_id}: layer groups {meta.layer_groups} do not cover {geo.num_layers} layers")
    expected = [(b - a) * 2 * nb * geo.block_nbytes for a, b in meta.layer_groups]
    if list(meta.group_nbytes) != expected:
        raise ValueError(f"{meta.req_id}: group sizes {meta.group_nbytes} != {expected} for this cache geometry")


def to_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(position, first_block, length)`` runs of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            p, s, n = runs[-1]
            runs[-1] = (p, s, n + 1)
        else:
            runs.append((pos, b, 1))
    return runs


def _wide_dtype(row_bytes: int) -> torch.dtype:
    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if row_bytes % size == 0:
            return dt
    return torch.uint8


class BlockMover:
    """Copies one list of block ids between ``kv_cache`` and per-group byte buffers."""

    def __init__(self, kv_cache: torch.Tensor, block_ids: list[int], layer_groups: list[tuple[int, int]]) -> None:
        geo = geometry_of(kv_cache)
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        num_blocks = kv_cache.shape[2]
        if not block_ids:
            raise ValueError("no block ids")
        bad = [b for b in block_ids if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:5]} out of range for a cache of {num_blocks} blocks")
        self.geometry = geo
        self.block_ids = list(block_ids)
        self.layer_groups = list(layer_groups)
        nb = len(block_ids)
        row_bytes = geo.block_nbytes
        wide = _wide_dtype(row_bytes)
        self._width = row_bytes // torch.empty((), dtype=wide).element_size()
        self._wide = wide
        # [num_layers * 2, num_blocks, width]: row r = (layer r // 2, K if r even else V)
        self._rows = kv_cache.view(torch.uint8).view(geo.num_layers * 2, num_blocks, row_bytes).view(wide)
        self._idx = torch.tensor(self.block_ids, dtype=torch.long, device=kv_cache.device)
        runs = to_runs(self.block_ids)
        self._runs = runs if len(runs) <= max(1, nb // 8) else None  # few long runs: strided copies
        self.group_nbytes = [(b - a) * 2 * nb * row_bytes for a, b in layer_groups]

    @property
    def num_groups(self) -> int:
        return len(self.layer_groups)

    def group_view(self, g: int, buf: torch.Tensor) -> torch.Tensor:
        """Group ``g``'s part of ``buf`` as ``[rows, num_blocks, width]`` of the wide dtype."""
        n = self.group_nbytes[g]
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < n:
            raise ValueError(f"group {g} needs a 1-D uint8 buffer of >= {n} bytes")
        a, b = self.layer_groups[g]
        return buf[:n].view(self._wide).view((b - a) * 2, len(self.block_ids), self._width)

    def _src(self, g: int) -> torch.Tensor:
        a, b = self.layer_groups[g]
        return self._rows[2 * a : 2 * b]

    def pack(self, g: int, buf: torch.Tensor) -> None:
        out, src = self.group_view(g, buf), self._src(g)
        if self._runs is not None:
            for pos, start, n in self._runs:
                out[:, pos : pos + n].copy_(src[:, start : start + n])
        else:
            torch.index_select(src, 1, self._idx, out=out)

    def unpack(self, g: int, buf: torch.Tensor) -> None:
        data, dst = self.group_view(g, buf), self._src(g)
        if self._runs is not None:
            for pos, start, n in self._runs:
                dst[:, start : start + n].copy_(data[:, pos : pos + n])
        else:
            dst.index_copy_(1, self._idx, data)


def digest(buf: torch.Tensor) -> bytes:
    """blake2b-128 of a tensor's raw bytes (a device tensor is copied to the host first)."""
    if buf.device.type != "cpu":
        buf = buf.cpu()
    raw = buf.contiguous().view(torch.uint8).reshape(-1).numpy()
    return hashlib.blake2b(memoryview(raw), digest_size=16).digest()


def blocks_digest(kv_cache: torch.Tensor, block_ids: list[int], layer_groups: list[tuple[int, int]]) -> str:
    """Hex digest of the packed bytes of ``block_ids`` (all groups, in order): equal on the
    sending and receiving cache iff every transferred byte arrived (debug/tests)."""
    mover = BlockMover(kv_cache, block_ids, layer_groups)
    h = hashlib.blake2b(digest_size=16)
    for g in range(mover.num_groups):
        buf = torch.empty(mover.group_nbytes[g], dtype=torch.uint8, device=kv_cache.device)
        mover.pack(g, buf)
        h.update(digest(buf))
    return h.hexdigest()


def combine_digests(digests: list[bytes]) -> str:
    """The :func:`blocks_digest` value from per-group digests."""
    h = hashlib.blake2b(digest_size=16)
    for d in digests:
        h.update(d)
    return h.hexdigest()


class StagingPool:
    """Reusable uint8 staging buffers. ``acquire(n)`` returns a buffer of at least ``n``
    bytes (best fit among free ones, else a new one rounded up to ``align``); ``release``
    gives it back. At most ``max_cached_bytes`` of free buffers are kept. Buffers live on
    ``device`` (default CPU); ``pin_memory=True``: page-locked host memory (needs CUDA)."""

    def __init__(
        self, max_cached_bytes: int = 1 << 30, align: int = 1 << 16, *, device=None, pin_memory: bool = False
    ) -> None:
        self.max_cached_bytes = max_cached_bytes
        self.align = align
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.pin_memory = pin_memory
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (capacity, serial, buf), sorted
        self._serial = 0
        self.num_allocated = 0

    @property
    def cached_bytes(self) -> int:
        return sum(c for c, _, _ in self._free)

    def acquire(self, nbytes: int) -> torch.Tensor:
        i = bisect.bisect_left(self._free, (nbytes, -1))
        if i < len(self._free) and self._free[i][0] <= 4 * nbytes + self.align:
            return self._free.pop(i)[2]
        cap = -(-max(nbytes, 1) // self.align) * self.align
        self.num_allocated += 1
        return torch.empty(cap, dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory)

    def release(self, buf: torch.Tensor) -> None:
        self._serial += 1
        bisect.insort(self._free, (buf.numel(), self._serial, buf))
        while self.cached_bytes > self.max_cached_bytes and self._free:
            self._free.pop()  # drop the largest

    def warm(self, nbytes: int, count: int) -> None:
        """Pre-allocate and touch ``count`` buffers of ``nbytes`` (no page faults later)."""
        bufs = [self.acquire(nbytes) for _ in range(count)]
        for b in bufs:
            b.fill_(0)
            self.release(b)

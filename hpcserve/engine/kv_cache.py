"""Paged KV block manager with prefix caching. No torch: ids and counts only.

The model runner owns the KV tensors, shaped ``[num_blocks, block_size, kv_heads,
head_dim]`` per layer and per K/V; this module decides which block ids each
request uses.

Block lifecycle::

    free (no hash) ──allocate──► in use (ref_cnt ≥ 1) ──full & computed──► in use + hashed
          ▲                                                                     │ free()
          │◄───────────── evicted (hash dropped) when the free list reuses it ◄─┤
                                                                                ▼
                                           cached-free: ref_cnt 0, still findable by hash

A full block's hash chains its parent's hash with its token ids, so a hash names
the whole prefix up to and including that block. The hash is keyed BLAKE2b (16 bytes) with a
random key per manager (``hash_key``), so nobody outside can compute or collide block hashes
(an unkeyed 64-bit ``hash()`` could be steered to collide, serving one prompt another's KV). The
chain starts from the request's ``cache_salt``: requests hit only blocks of their own salt, so a
tenant with its own salt (``tenants.NAME.isolate-prefix-cache``) shares nothing and nobody can
time its cache hits; the empty salt is the shared namespace. ``find_cached_prefix`` walks a
request's chain and takes every block still present (in use by another request,
or cached-free), which saves recomputing shared prefixes (system prompts,
recomputation after preemption).

The free list is a queue: freed blocks go to the back (a request's tail blocks
first, so the prefix stays cached longest), allocation pops from the front.

Interface (used by the scheduler):
- ``find_cached_prefix(req) -> (block_ids, num_tokens)``
- ``allocate(req, num_new_tokens, cached_block_ids=()) -> bool``: adds cached
  blocks (taking a ref) and enough new blocks for ``num_computed + num_new``
  tokens; on shortage allocates nothing and returns False.
- ``commit_computed(req)``: hash and register blocks that became full.
- ``free(req)``: release all of the request's blocks.
- ``num_free_blocks``, ``usage``.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict

from hpcserve.engine.request import Request

HASH_BYTES = 16


def chain_hash(key: bytes, parent: bytes, token_ids) -> bytes:
    """Keyed hash of one full block: its parent's hash (the salt's root for the first block) and
    its token ids."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), key=key, digest_size=HASH_BYTES).digest()


def salt_root(key: bytes, salt: str) -> bytes:
    """The parent hash of a request's first block: its cache salt, hashed with the key."""
    return hashlib.blake2b(b"salt\0" + salt.encode(), key=key, digest_size=HASH_BYTES).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_key: bytes | None = None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_key = hash_key if hash_key is not None else os.urandom(32)
        self._roots: dict[str, bytes] = {}  # cache salt -> root hash
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Free queue: block id -> None, in eviction order (front = next to reuse).
        # Block 0 is never handed out: the runner uses it as a scratch slot.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_cache_hits = 0  # tokens served from the prefix cache
        self.num_cache_queries = 0  # prompt tokens looked up

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def find_cached_prefix(self, req: Request) -> tuple[list[int], int]:
        """Blocks holding the longest cached prefix of ``req``'s tokens.

        Always leaves at least one token to compute, so the step that follows
        produces logits for the next token.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._extend_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        found: list[int] = []
        for h in req.block_hashes[:max_blocks]:
            b = self.cached.get(h)
            if b is None:
                break
            found.append(b)
        self.num_cache_queries += req.num_tokens
        self.num_cache_hits += len(found) * self.block_size
        return found, len(found) * self.block_size

    # ------------------------------------------------------------- mutations
    def allocate(self, req: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        n_cached_free = sum(1 for b in cached_block_ids if self.ref_cnt[b] == 0)
        total = req.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        n_new = max(0, -(-total // self.block_size) - len(req.block_ids) - len(cached_block_ids))
        if n_new + n_cached_free > len(self._free):
            return False
        for b in cached_block_ids:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1
            req.block_ids.append(b)
        for _ in range(n_new):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_cnt[b] = 1
            req.block_ids.append(b)
        return True

    def commit_computed(self, req: Request) -> None:
        """Register hashes for blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        self._extend_hashes(req, num_full)
        for i in range(num_full):
            b = req.block_ids[i]
            if self.block_hash[b] is not None:
                continue
            h = req.block_hashes[i]
            if h in self.cached:  # same content computed twice (concurrent requests): keep the first
                continue
            self.block_hash[b] = h
            self.cached[h] = b

    def free(self, req: Request) -> None:
        for b in reversed(req.block_ids):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is None:
                    self._free[b] = None
                    self._free.move_to_end(b, last=False)  # uncached: reuse first
                else:
                    self._free[b] = None
        req.block_ids = []

    def reset_prefix_cache(self) -> None:
        for b in list(self._free):
            self._evict(b)

    # -------------------------------------------------------------- helpers
    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None

    def _extend_hashes(self, req: Request, upto: int | None = None) -> None:
        """Make sure ``req.block_hashes`` covers the first ``upto`` full blocks."""
        bs = self.block_size
        limit = req.num_tokens // bs if upto is None else upto
        hashes = req.block_hashes
        if len(hashes) >= limit:
            return
        root = self._roots.get(req.cache_salt)
        if root is None:
            root = self._roots[req.cache_salt] = salt_root(self.hash_key, req.cache_salt)
        while len(hashes) < limit:
            i = len(hashes)
            tokens = [req.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            hashes.append(chain_hash(self.hash_key, hashes[-1] if hashes else root, tokens))

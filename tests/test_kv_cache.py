"""KVCacheManager unit tests: block ids and counts only, no torch."""

from __future__ import annotations

import pytest

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import Request, SamplingParams

BS = 4


def mkreq(rid: str, prompt: list[int], **kw) -> Request:
    return Request(rid, prompt, SamplingParams(**kw), eos_token_ids=())


def compute_all(
    kv: KVCacheManager, req: Request, num_tokens: int | None = None
) -> None:
    """Pretend the runner computed ``num_tokens`` (default: all known) tokens of ``req``."""
    n = req.num_tokens if num_tokens is None else num_tokens
    if kv.blocks_needed(req, n - req.num_computed_tokens):
        assert kv.allocate(req, n - req.num_computed_tokens)
    req.num_computed_tokens = n
    kv.commit_computed(req)


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit like the scheduler does: reuse the cached prefix, allocate the rest."""
    ids, n = kv.find_cached_prefix(req)
    assert kv.allocate(req, req.num_tokens - n, ids)
    req.num_computed_tokens = n
    return n


def check_consistent(kv: KVCacheManager, reqs: list[Request]) -> None:
    owners: dict[int, int] = {}
    for r in reqs:
        assert len(set(r.block_ids)) == len(r.block_ids)
        for b in r.block_ids:
            owners[b] = owners.get(b, 0) + 1
    assert 0 not in owners and 0 not in kv._free
    for b in range(1, kv.num_blocks):
        assert kv.ref_cnt[b] == owners.get(b, 0), b
        assert (kv.ref_cnt[b] == 0) == (b in kv._free), b
    used = sum(1 for b in range(1, kv.num_blocks) if kv.ref_cnt[b] > 0)
    assert kv.num_free_blocks + used == kv.num_blocks - 1
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h
    assert sum(h is not None for h in kv.block_hash) == len(kv.cached)


# ---------------------------------------------------------------- allocation
def test_rejects_too_few_blocks():
    with pytest.raises(ValueError):
        KVCacheManager(1, BS)


@pytest.mark.parametrize(
    "n,blocks", [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (13, 4)]
)
def test_allocation_is_ceil_division(n, blocks):
    kv = KVCacheManager(10, BS)
    r = mkreq("a", list(range(n)))
    assert kv.blocks_needed(r, n) == blocks
    assert kv.allocate(r, n)
    assert len(r.block_ids) == blocks
    assert kv.num_free_blocks == 9 - blocks


def test_allocation_grows_from_computed_tokens():
    kv = KVCacheManager(10, BS)
    r = mkreq("a", list(range(5)))
    assert kv.allocate(r, 5)
    assert len(r.block_ids) == 2
    r.num_computed_tokens = 5
    assert kv.blocks_needed(r, 3) == 0
    assert kv.allocate(r, 3)  # 8 tokens: still 2 blocks
    assert len(r.block_ids) == 2
    assert kv.allocate(r, 4)  # 9 tokens: 3 blocks
    assert len(r.block_ids) == 3
    assert kv.num_free_blocks == 6


def test_block_zero_is_never_handed_out():
    kv = KVCacheManager(5, BS)
    assert kv.num_free_blocks == 4
    r = mkreq("a", list(range(16)))
    assert kv.allocate(r, 16)
    assert sorted(r.block_ids) == [1, 2, 3, 4]
    assert kv.num_free_blocks == 0
    assert not kv.allocate(mkreq("b", [1]), 1)


def test_allocate_fails_atomically():
    kv = KVCacheManager(4, BS)  # 3 usable blocks
    a = mkreq("a", list(range(4)))
    assert kv.allocate(a, 4)
    b = mkreq("b", list(range(100, 112)))  # needs 3, only 2 free
    free_before = list(kv._free)
    assert not kv.allocate(b, 12)
    assert b.block_ids == []
    assert list(kv._free) == free_before
    assert sum(kv.ref_cnt) == 1
    check_consistent(kv, [a, b])
    # a smaller request still fits
    assert kv.allocate(b, 8)
    assert kv.num_free_blocks == 0
    check_consistent(kv, [a, b])


def test_allocate_with_cached_blocks_fails_atomically():
    kv = KVCacheManager(4, BS)  # 3 usable
    a = mkreq("a", list(range(9)))
    compute_all(kv, a)  # 3 blocks, 2 full and hashed
    a_blocks = list(a.block_ids)
    kv.free(a)
    assert kv.num_free_blocks == 3
    b = mkreq("b", list(range(8)) + list(range(50, 58)))  # 16 tokens: 2 cached + 2 new
    ids, n = kv.find_cached_prefix(b)
    assert n == 8 and ids == a_blocks[:2]
    hashes_before = dict(kv.cached)
    free_before = list(kv._free)
    assert not kv.allocate(b, b.num_tokens - n, ids)  # needs 2 cached-free + 2 new > 3
    assert b.block_ids == []
    assert all(kv.ref_cnt[x] == 0 for x in ids)
    assert list(kv._free) == free_before
    assert kv.cached == hashes_before
    check_consistent(kv, [b])


def test_free_returns_blocks_and_usage():
    kv = KVCacheManager(9, BS)
    assert kv.usage == 0.0 and kv.num_free_blocks == 8
    a, b = mkreq("a", list(range(8))), mkreq("b", list(range(10, 26)))
    assert kv.allocate(a, 8) and kv.allocate(b, 16)
    assert kv.num_free_blocks == 2
    assert kv.usage == pytest.approx(6 / 8)
    kv.free(a)
    assert a.block_ids == []
    assert kv.num_free_blocks == 4 and kv.usage == pytest.approx(0.5)
    kv.free(b)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    check_consistent(kv, [a, b])


# ---------------------------------------------------------------- prefix cache
def test_commit_hashes_only_full_computed_blocks():
    kv = KVCacheManager(10, BS)
    r = mkreq("a", list(range(10)))
    assert kv.allocate(r, 10)
    r.num_computed_tokens = 3
    kv.commit_computed(r)
    assert kv.cached == {}
    r.num_computed_tokens = 7
    kv.commit_computed(r)
    assert len(kv.cached) == 1 and kv.block_hash[r.block_ids[0]] is not None
    r.num_computed_tokens = 10
    kv.commit_computed(r)
    assert len(kv.cached) == 2 and kv.block_hash[r.block_ids[2]] is None


def test_shared_prefix_ref_counts():
    kv = KVCacheManager(12, BS)
    a = mkreq("a", list(range(10)))
    assert admit(kv, a) == 0
    compute_all(kv, a)
    b = mkreq("b", list(range(8)) + [77, 78, 79])
    assert admit(kv, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    shared = a.block_ids[:2]
    assert all(kv.ref_cnt[x] == 2 for x in shared)
    check_consistent(kv, [a, b])

    a_tail = a.block_ids[2]
    kv.free(a)
    assert all(kv.ref_cnt[x] == 1 for x in shared)
    assert all(x not in kv._free for x in shared)  # b still owns them
    assert a_tail in kv._free
    assert b.block_ids[:2] == shared
    check_consistent(kv, [b])

    kv.free(b)
    assert kv.num_free_blocks == 11
    # the prefix is still cached after everyone freed it
    c = mkreq("c", list(range(8)) + [1])
    ids, n = kv.find_cached_prefix(c)
    assert ids == shared and n == 8


def test_find_cached_prefix_longest_chain_and_leaves_one_token():
    kv = KVCacheManager(20, BS)
    a = mkreq("a", list(range(13)))
    compute_all(kv, a)  # 3 full blocks hashed
    assert len(kv.cached) == 3
    # exactly 12 tokens = 3 full cached blocks: must leave >= 1 token to compute
    for n_tok, want in [
        (12, 8),
        (13, 12),
        (14, 12),
        (9, 8),
        (8, 4),
        (5, 4),
        (4, 0),
        (1, 0),
    ]:
        r = mkreq(f"q{n_tok}", list(range(n_tok)))
        ids, n = kv.find_cached_prefix(r)
        assert n == want, n_tok
        assert ids == a.block_ids[: want // BS]
        assert n < r.num_tokens
    # a divergence in block 2 stops the chain at 2 blocks
    r = mkreq("div", list(range(8)) + [99, 9, 10, 11, 12, 13])
    assert kv.find_cached_prefix(r) == (a.block_ids[:2], 8)
    # divergence in the first block: nothing
    r = mkreq("div0", [99] + list(range(1, 13)))
    assert kv.find_cached_prefix(r) == ([], 0)


def test_cached_prefix_includes_output_tokens():
    kv = KVCacheManager(20, BS)
    a = mkreq("a", [1, 2, 3])
    compute_all(kv, a)
    a.output_token_ids += [4, 5, 6]  # 6 known tokens; 5 computed
    compute_all(kv, a, 5)
    assert len(kv.cached) == 1
    r = mkreq("r", [1, 2, 3, 4, 5, 6])
    assert kv.find_cached_prefix(r) == (a.block_ids[:1], 4)


def test_hash_chain_same_block_different_prefix_does_not_match():
    kv = KVCacheManager(20, BS)
    a = mkreq("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    compute_all(kv, a)
    # same second block [5,6,7,8] behind a different first block
    b = mkreq("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert kv.find_cached_prefix(b) == ([], 0)
    # the block [5,6,7,8] at position 0 does not match either
    c = mkreq("c", [5, 6, 7, 8, 0])
    assert kv.find_cached_prefix(c) == ([], 0)
    d = mkreq("d", [1, 2, 3, 4, 5, 6, 7, 8, 1])
    assert kv.find_cached_prefix(d) == (a.block_ids[:2], 8)


def test_concurrent_duplicate_content_keeps_first():
    kv = KVCacheManager(20, BS)
    p = list(range(9))
    a, b = mkreq("a", p), mkreq("b", p)
    assert admit(kv, a) == 0 and admit(kv, b) == 0  # neither computed yet: no hit
    assert not set(a.block_ids) & set(b.block_ids)
    compute_all(kv, a)
    compute_all(kv, b)
    assert len(kv.cached) == 2
    assert set(kv.cached.values()) == set(a.block_ids[:2])
    assert all(kv.block_hash[x] is None for x in b.block_ids)
    a_blocks = list(a.block_ids)
    kv.free(a)
    kv.free(b)
    check_consistent(kv, [])
    assert kv.find_cached_prefix(mkreq("c", p)) == (a_blocks[:2], 8)


def test_prefix_caching_disabled_never_hits():
    kv = KVCacheManager(20, BS, enable_prefix_caching=False)
    a = mkreq("a", list(range(13)))
    compute_all(kv, a)
    assert kv.cached == {} and all(h is None for h in kv.block_hash)
    b = mkreq("b", list(range(13)))
    assert kv.find_cached_prefix(b) == ([], 0)
    kv.free(a)
    assert kv.find_cached_prefix(b) == ([], 0)
    assert kv.num_cache_hits == 0


def test_hit_counters():
    kv = KVCacheManager(20, BS)
    a = mkreq("a", list(range(9)))
    compute_all(kv, a)
    kv.find_cached_prefix(mkreq("b", list(range(10))))
    assert kv.num_cache_hits == 8 and kv.num_cache_queries == 10


# ---------------------------------------------------------------- eviction
def test_uncached_free_blocks_are_reused_before_cached_ones():
    kv = KVCacheManager(7, BS)  # 6 usable
    a = mkreq("a", list(range(9)))  # 3 blocks, 2 hashed
    compute_all(kv, a)
    a_blocks = list(a.block_ids)
    kv.free(a)
    assert kv.num_free_blocks == 6
    # 3 never-used blocks + a's unhashed tail: all uncached, used first
    b = mkreq("b", list(range(100, 116)))
    assert kv.allocate(b, 16)
    assert a_blocks[2] in b.block_ids
    assert not set(b.block_ids) & set(a_blocks[:2])
    assert len(kv.cached) == 2
    assert kv.find_cached_prefix(mkreq("q", list(range(9))))[1] == 8
    # now only cached-free blocks remain: the next allocation evicts one (hash dropped)
    c = mkreq("c", [200])
    assert kv.allocate(c, 1)
    evicted = c.block_ids[0]
    assert evicted in a_blocks[:2]
    assert kv.block_hash[evicted] is None
    assert len(kv.cached) == 1
    check_consistent(kv, [b, c])


def test_tail_blocks_evicted_before_head_blocks():
    kv = KVCacheManager(6, BS)  # 5 usable
    a = mkreq("a", list(range(17)))  # 5 blocks, 4 hashed
    compute_all(kv, a)
    head = list(a.block_ids)
    kv.free(a)
    probe = mkreq("probe", list(range(17)))
    assert kv.find_cached_prefix(probe)[1] == 16
    x = mkreq("x", [500])
    assert kv.allocate(x, 1)  # takes a's unhashed 5th block: nothing evicted
    assert x.block_ids == [head[4]]
    assert kv.find_cached_prefix(probe)[1] == 16
    for want_tokens, victim in [
        (12, head[3]),
        (8, head[2]),
        (4, head[1]),
        (0, head[0]),
    ]:
        y = mkreq(f"y{want_tokens}", [600])
        assert kv.allocate(y, 1)
        assert y.block_ids == [victim]
        ids, n = kv.find_cached_prefix(probe)
        assert n == want_tokens and ids == head[: want_tokens // BS]


def test_reused_cached_block_moves_to_back_of_free_queue():
    kv = KVCacheManager(5, BS)  # 4 usable
    a = mkreq("a", list(range(5)))
    compute_all(kv, a)  # block 0 hashed, block 1 not
    a0 = a.block_ids[0]
    kv.free(a)
    b = mkreq("b", list(range(200, 205)))
    compute_all(kv, b)
    b0 = b.block_ids[0]
    kv.free(b)
    # hit a's prefix again and free it: a0 becomes most recently used
    c = mkreq("c", list(range(4)) + [9])
    assert admit(kv, c) == 4 and c.block_ids[0] == a0
    kv.free(c)
    # fill the 2 uncached blocks, then 1 more: the LRU cached block (b0) goes first
    d = mkreq("d", list(range(300, 312)))
    assert kv.allocate(d, 12)
    assert b0 in d.block_ids and a0 not in d.block_ids
    assert kv.find_cached_prefix(mkreq("e", list(range(5))))[1] == 4


def test_reset_prefix_cache_drops_free_hashes_only():
    kv = KVCacheManager(12, BS)
    a, b = mkreq("a", list(range(9))), mkreq("b", list(range(50, 59)))
    compute_all(kv, a)
    compute_all(kv, b)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.find_cached_prefix(mkreq("qa", list(range(9)))) == ([], 0)
    assert kv.find_cached_prefix(mkreq("qb", list(range(50, 59))))[1] == 8
    check_consistent(kv, [b])


# ---------------------------------------------------------------- keyed hashes and salts
def test_hashes_are_keyed_blake2b_per_manager():
    a, b = KVCacheManager(10, BS), KVCacheManager(10, BS)
    ra, rb = mkreq("a", list(range(3, 12))), mkreq("b", list(range(3, 12)))
    admit(a, ra)
    admit(b, rb)
    compute_all(a, ra)
    compute_all(b, rb)
    assert len(ra.block_hashes) == 2 and all(isinstance(h, bytes) and len(h) == 16 for h in ra.block_hashes)
    assert ra.block_hashes != rb.block_hashes  # a random key per manager: nobody can precompute them
    same = KVCacheManager(10, BS, hash_key=a.hash_key)
    rc = mkreq("c", list(range(3, 12)))
    admit(same, rc)
    compute_all(same, rc)
    assert rc.block_hashes == ra.block_hashes  # ... and a pure function of (key, salt, tokens)


def test_cache_salt_separates_namespaces():
    kv = KVCacheManager(20, BS)
    prompt = list(range(3, 14))  # 2 full blocks + 3 tokens
    first = mkreq("x", prompt)
    admit(kv, first)
    compute_all(kv, first)
    kv.free(first)
    assert admit(kv, mkreq("same", prompt)) == 8  # the shared namespace ("") hits
    assert admit(kv, Request("iso", prompt, SamplingParams(), cache_salt="tenant:iso")) == 0
    iso = Request("iso2", prompt, SamplingParams(), cache_salt="tenant:iso")
    admit(kv, iso)
    compute_all(kv, iso)
    kv.free(iso)
    assert admit(kv, Request("iso3", prompt, SamplingParams(), cache_salt="tenant:iso")) == 8  # its own blocks
    assert admit(kv, Request("other", prompt, SamplingParams(), cache_salt="tenant:other")) == 0

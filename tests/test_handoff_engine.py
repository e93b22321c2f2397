"""Engine-level KV handoff (hpcserve/engine/handoff.py): a prefill engine and a decode engine in
one process, joined by the loopback connector. Greedy output must equal one colocated engine's."""

from __future__ import annotations

import random
import time

import pytest

from hpcserve.engine.request import PRIORITY_BATCH, PRIORITY_INTERACTIVE, SamplingParams


def _engines(model_dir, checksum=False, timeout_s=30.0, **cfg):
    from hpcserve.engine.core import EngineConfig, LLMEngine
    from hpcserve.transfer.loopback import LoopbackChannel, LoopbackConnector

    base = dict(model=str(model_dir), num_kv_blocks=cfg.pop("num_kv_blocks", 96), block_size=4, max_num_seqs=8,
                max_num_batched_tokens=cfg.pop("max_num_batched_tokens", 64), max_model_len=128, **cfg)
    colo, pre, dec = (LLMEngine(EngineConfig(**base)) for _ in range(3))
    ch = LoopbackChannel()
    pre.attach_handoff(LoopbackConnector(ch, 0, checksum=checksum, timeout_s=timeout_s), rank=0)
    dec.attach_handoff(LoopbackConnector(ch, 1, checksum=checksum, timeout_s=timeout_s), rank=1)
    return colo, pre, dec


def _run_colocated(eng, prompts, params):
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.req_id] = o.token_ids
    return out


def _pump(pre, dec, prompts, params, priorities=None, on_ready=None):
    """Drive the daemon's part by hand: prefill-only on ``pre``, ready → add_remote on ``dec``,
    recv_meta → start_send on ``pre``; returns ({req_id: tokens}, [result events])."""
    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, params, priority=(priorities or {}).get(i, PRIORITY_INTERACTIVE),
                        prefill_only=True)
    out, results, texts = {}, [], {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not (pre.has_unfinished_requests() or dec.has_unfinished_requests() or pre.has_handoff_work()
                or dec.has_handoff_work()):
            break
        for eng in (pre, dec):
            if eng.has_unfinished_requests():
                for o in eng.step():
                    assert eng is dec, f"the prefill engine produced output {o}"
                    texts[o.req_id] = texts.get(o.req_id, "") + o.new_text
                    if o.finished:
                        out[o.req_id] = o.token_ids
        for kind, rid, payload in pre.handoff.poll():
            if kind == "ready":
                if on_ready is not None:
                    on_ready(rid)
                i = int(rid[1:])
                dec.add_remote_request(rid, pre.tokenize(prompts[i]), params,
                                       (priorities or {}).get(i, PRIORITY_INTERACTIVE), 0, payload["block_ids"],
                                       payload["num_tokens"], payload["num_cached_tokens"])
            elif kind == "result":
                results.append(("send", rid, payload))
        for kind, rid, payload in dec.handoff.poll():
            if kind == "recv_meta":
                pre.handoff.start_send(rid, payload)
            elif kind == "result":
                results.append(("recv", rid, payload))
    else:
        raise AssertionError("handoff pump did not finish")
    return out, results, texts


def _prompts(n, vocab, seed=0, lo=2, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_disaggregated_greedy_equals_colocated(tiny_model_factory):
    colo, pre, dec = _engines(tiny_model_factory("llama", num_layers=3), checksum=True)
    prompts = _prompts(12, colo.model_config.vocab_size, lo=2, hi=70)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = _run_colocated(colo, prompts, params)
    got, results, _ = _pump(pre, dec, prompts, params)
    assert got == ref
    recvs = [p for k, _, p in results if k == "recv"]
    sends = [p for k, _, p in results if k == "send"]
    assert len(recvs) == len(sends) == len(prompts) and all(p["success"] for p in recvs + sends)
    assert all(p["checksum_verified"] for p in recvs)
    assert sum(p["nbytes"] for p in recvs) == sum(p["nbytes"] for p in sends) > 0
    # everything released on both sides
    assert pre.kv.num_free_blocks == pre.kv.num_blocks - 1 and dec.kv.num_free_blocks == dec.kv.num_blocks - 1
    assert pre.handoff.counters()["num_sent"] == len(prompts) == dec.handoff.counters()["num_received"]


def test_sampled_with_seed_and_logprobs_match(tiny_model_factory):
    colo, pre, dec = _engines(tiny_model_factory("llama", num_layers=2))
    prompts = _prompts(5, colo.model_config.vocab_size, seed=3, lo=5, hi=40)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True, logprobs=2)
    ref = _run_colocated(colo, prompts, params)
    got, _, _ = _pump(pre, dec, prompts, params)
    assert got == ref


def test_failed_receive_falls_back_to_local_prefill(tiny_model_factory):
    """The prefill side never starts its send (a hung peer): the receive times out, the decode
    engine computes the prompt itself and the output is still produced once and equals colocated."""
    colo, pre, dec = _engines(tiny_model_factory("llama", num_layers=2), timeout_s=0.3)
    prompts = _prompts(3, colo.model_config.vocab_size, seed=5, lo=10, hi=30)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = _run_colocated(colo, prompts, params)
    real_start = pre.handoff.start_send
    pre.handoff.start_send = lambda rid, meta: None if rid == "r1" else real_start(rid, meta)  # r1's peer hangs
    got, results, _ = _pump(pre, dec, prompts, params)
    assert got == ref
    failed = [rid for k, rid, p in results if k == "recv" and not p["success"]]
    assert failed == ["r1"]
    assert dec.handoff.counters()["num_fallbacks"] == 1
    assert dec.kv.num_free_blocks == dec.kv.num_blocks - 1


def test_abort_while_receiving_frees_blocks_and_reports_once(tiny_model_factory):
    colo, pre, dec = _engines(tiny_model_factory("llama", num_layers=2), timeout_s=5.0)
    prompts = _prompts(2, colo.model_config.vocab_size, seed=7, lo=20, hi=30)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    real_start = pre.handoff.start_send
    aborted = []

    def start(rid, meta):
        if rid == "r0":  # abort on the decode side while its receive is posted
            assert dec.abort_request("r0")
            aborted.append(rid)
            pre.abort_request("r0")  # the daemon releases the prefill side too
            return
        real_start(rid, meta)

    pre.handoff.start_send = start
    got, _, _ = _pump(pre, dec, prompts, params)
    assert aborted == ["r0"]
    assert got["r0"] == [] and len(got["r1"]) == 5  # r0's abort output (no tokens), r1 complete
    assert dec.kv.num_free_blocks == dec.kv.num_blocks - 1
    assert pre.kv.num_free_blocks == pre.kv.num_blocks - 1


def test_interactive_handoff_preempts_batch_for_blocks(tiny_model_factory):
    """A decode engine full of batch work: the chat handoff preempts batch to land its KV."""
    _, pre, dec = _engines(tiny_model_factory("llama", num_layers=2), num_kv_blocks=24)
    vocab = dec.model_config.vocab_size
    for i in range(3):
        dec.add_request(f"b{i}", [5 + i] * 20, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                        priority=PRIORITY_BATCH)
    dec.step()  # batch prefills take most blocks
    assert dec.kv.num_free_blocks < 10
    prompts = _prompts(1, vocab, seed=9, lo=40, hi=40)
    got, results, _ = _pump(pre, dec, prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(got["r0"]) == 4 and all(len(got[f"b{i}"]) == 10 for i in range(3))
    assert dec.scheduler.num_preemptions >= 1
    assert [p["success"] for k, _, p in results if k == "recv"] == [True]


@pytest.mark.parametrize("n", [1])
def test_one_token_prompt_is_computed_locally(tiny_model_factory, n):
    colo, pre, dec = _engines(tiny_model_factory("llama", num_layers=2))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ref = _run_colocated(colo, [[7] * n], params)
    req = dec.add_remote_request("r0", [7] * n, params, PRIORITY_INTERACTIVE, 0, [], 0)
    assert req.req_id == "r0"
    out = {}
    while dec.has_unfinished_requests():
        for o in dec.step():
            if o.finished:
                out[o.req_id] = o.token_ids
    assert out == ref and dec.handoff.counters()["num_fallbacks"] == 1

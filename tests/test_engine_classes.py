"""Scheduling classes through the real engine (torch, tiny random llama): a chat
request arriving at an engine full of batch requests (every sequence slot, most of the
KV cache) gets its first token within a bounded number of ``engine.step()`` calls, and
the batch requests still finish with the outputs they have when run alone (greedy).
Steps are counted, never timed. With ``itl_target_s`` set, the ITL cap is applied on the way,
from a fixed step-cost model (so the schedule is the same on every machine; the online fit itself
is tested in test_step_cost.py and by the calibration test below)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from hpcserve.engine.request import PRIORITY_BATCH, PRIORITY_INTERACTIVE, SamplingParams
from hpcserve.engine.step_cost import StepCostModel

BS = 16
N_BATCH = 4
PROMPT, OUT = 20, 24  # a batch request peaks at 44 tokens: 3 blocks
STEP_COST = (1e-3, 1e-5, 1e-7)  # (a, b, c) of StepCostModel: about a tiny model's steps on a CPU


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_engine(path, **kw):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    cfg = {"model": str(path), "dtype": "float32", "block_size": BS, "max_num_seqs": N_BATCH}
    cfg["max_num_batched_tokens"] = 256
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory("llama", tie=False)


@pytest.fixture(scope="module")
def alone(model_path):
    """Greedy outputs of each request run alone in a roomy engine."""
    eng = make_engine(model_path)
    res = {}
    jobs = [(f"b{k}", prompt(PROMPT, 100 + k), OUT) for k in range(N_BATCH)] + [("chat", prompt(18, 7), 8)]
    for rid, p, n in jobs:
        eng.add_request(rid, p, greedy(n))
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[rid] = o.token_ids
    return res


@pytest.mark.parametrize("itl_target_s", [None, 0.05, 1e-6], ids=["no-cap", "cap-50ms", "cap-tiny"])
def test_chat_first_token_within_two_steps_and_batch_unchanged(model_path, alone, itl_target_s):
    # 4 batch requests x 3 blocks = 12 of 13 usable blocks, and all 4 sequence slots
    eng = make_engine(model_path, num_kv_blocks=14)
    for k in range(N_BATCH):
        eng.add_request(f"b{k}", prompt(PROMPT, 100 + k), greedy(OUT), priority=PRIORITY_BATCH)
    outputs: dict[str, list[int]] = {}
    # batch prefill, then decodes until every batch request holds its 3 blocks (from step 14: the token budget
    # alone decides, so this is the same on every machine; a tiny ITL cap would run them one at a time)
    for _ in range(16):
        for o in eng.step():
            outputs[o.req_id] = o.token_ids
    assert len(eng.scheduler.running) == N_BATCH and not eng.scheduler.waiting
    assert eng.kv.num_free_blocks <= 2
    if itl_target_s is not None:
        # now the ITL cap, with a fixed step-cost model: which tokens each step takes must not depend on
        # how fast this machine is (a model refitted from noisy steps changed the schedule between runs)
        eng.cost_model = eng.scheduler.cost_model = StepCostModel(coefficients=STEP_COST, resolve_every=10**9)
        eng.scheduler.itl_target_s = itl_target_s

    eng.add_request("chat", prompt(18, 7), greedy(8), priority=PRIORITY_INTERACTIVE)
    steps = 0
    while "chat" not in outputs:
        steps += 1
        assert steps <= 2, "chat request had no token after 2 steps"
        for o in eng.step():
            if o.token_ids:
                outputs[o.req_id] = o.token_ids
    assert eng.scheduler.num_preemptions >= 1  # it took a batch request's seat and blocks

    caps = []
    n = 0
    while eng.has_unfinished_requests():
        n += 1
        assert n < 2000
        for o in eng.step():
            outputs[o.req_id] = o.token_ids
        caps.append(eng.scheduler.last_cap_s)
    assert outputs == alone  # batch (one of them recomputed after preemption) and chat: as alone
    assert eng.kv.num_free_blocks == 13
    cm = eng.cost_model
    assert cm.num_samples > 8  # the steps were observed
    if itl_target_s is None:
        assert all(c is None for c in caps)
    else:
        assert cm.calibrated and all(x >= 0 for x in cm.coefficients)
        assert any(c is not None for c in caps)


def test_calibrate_leaves_an_empty_engine_with_a_fitted_cost_model(tiny_model_factory):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_model_factory("llama")), num_threads=1, itl_target_s=0.05))
    free = eng.kv.num_free_blocks
    eng.calibrate()
    assert eng.cost_model.calibrated and eng.cost_model.predict(64, 64) > 0
    assert not eng.has_unfinished_requests() and eng.kv.num_free_blocks == free
    assert not eng.kv.cached  # the throw-away prompts left nothing in the prefix cache

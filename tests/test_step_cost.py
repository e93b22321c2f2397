"""StepCostModel (hpcserve.engine.step_cost): online fit of t ≈ a + b·tokens + c·context.
No torch, no numpy."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from hpcserve.engine.step_cost import StepCostModel


def step_shape(rng: random.Random) -> tuple[int, int]:
    """A plausible step: some decodes over contexts of 20..2000 tokens, sometimes a prefill chunk."""
    n_dec = rng.randrange(0, 33)
    ctx = sum(rng.randrange(20, 2000) for _ in range(n_dec))
    chunk = rng.choice([0, 0, rng.randrange(1, 512)])
    start = rng.randrange(0, 1000)
    if n_dec + chunk == 0:
        chunk = 1
    return n_dec + chunk, ctx + (start + chunk if chunk else 0)


def feed(m: StepCostModel, rng: random.Random, coef, k: int, noise: float = 0.03) -> None:
    a, b, c = coef
    for _ in range(k):
        n, ctx = step_shape(rng)
        t = a + b * n + c * ctx
        m.observe(n, ctx, t * (1 + rng.gauss(0, noise)))


def close(x: float, want: float, rel: float) -> bool:
    return abs(x - want) <= rel * abs(want)


def test_no_torch_or_numpy():
    code = "import hpcserve.engine.step_cost, sys; assert not {'torch', 'numpy'} & set(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


def test_none_before_calibration():
    m = StepCostModel(min_samples=8)
    assert m.predict(10, 100) is None and m.coefficients is None and not m.calibrated
    assert m.max_new_tokens(0.01, 0, 0, 0, 37) == 37  # uncalibrated: no cap
    for k in range(7):
        m.observe(1 + k, 100, 0.01 + 0.001 * k)
    assert m.predict(10, 100) is None  # 7 < min_samples
    m.observe(8, 100, 0.017)
    assert m.calibrated and m.predict(10, 100) == pytest.approx(0.019, rel=1e-2)  # small ridge bias


def test_no_calibration_without_spread():
    m = StepCostModel(min_samples=8)
    for k in range(50):  # all steps the same size: b cannot be told apart from a
        m.observe(32, 1000 + k, 0.05)
    assert m.predict(32, 1000) is None
    m.observe(1, 1000, 0.01)
    assert m.predict(32, 1000) is not None


def test_ignores_invalid_observations():
    m = StepCostModel(min_samples=3)
    for args in [
        (0, 10, 0.1),
        (-1, 10, 0.1),
        (5, -1, 0.1),
        (5, 10, -0.1),
        (5, 10, float("nan")),
        (5, 10, float("inf")),
    ]:
        m.observe(*args)
    assert m.num_samples == 0


@pytest.mark.parametrize("seed", range(5))
def test_recovers_coefficients_from_noisy_data(seed):
    rng = random.Random(seed)
    coef = (4e-3, 1.5e-4, 2e-6)
    m = StepCostModel()
    feed(m, rng, coef, 300, noise=0.03)
    a, b, c = m.coefficients
    # 3% noise on steps of up to ~0.1 s is about as large as a (4 ms): a is the loosest
    # (worst over 200 seeds: a 10%, b 2%, c 2%, predictions 9%)
    assert close(a, coef[0], 0.2) and close(b, coef[1], 0.05) and close(c, coef[2], 0.05), m.coefficients
    for _ in range(50):
        n, ctx = step_shape(rng)
        want = coef[0] + coef[1] * n + coef[2] * ctx
        assert close(m.predict(n, ctx), want, 0.15)


def test_exact_data_is_fit_exactly():
    rng = random.Random(1)
    coef = (2e-3, 1e-4, 3e-7)
    m = StepCostModel()
    feed(m, rng, coef, 64, noise=0.0)
    for got, want in zip(m.coefficients, coef):
        assert close(got, want, 1e-3)


@pytest.mark.parametrize("coef", [(0.0, 2e-4, 1e-6), (5e-3, 0.0, 1e-6), (5e-3, 2e-4, 0.0), (0.01, 0.0, 0.0)])
def test_coefficients_non_negative(coef):
    rng = random.Random(3)
    m = StepCostModel()
    feed(m, rng, coef, 200, noise=0.1)  # noise would push the zero term below 0 in a plain fit
    got = m.coefficients
    assert all(x >= 0 for x in got), got
    for _ in range(20):
        n, ctx = step_shape(rng)
        assert m.predict(n, ctx) >= 0


def test_negative_trend_falls_back_to_fewer_terms():
    # time *decreasing* with context (nonsense for the model): c is dropped, not negative
    m = StepCostModel(min_samples=8)
    rng = random.Random(4)
    for _ in range(100):
        n = rng.randrange(1, 100)
        ctx = rng.randrange(0, 10000)
        m.observe(n, ctx, 0.01 + 1e-4 * n - 5e-7 * ctx + 0.006)
    a, b, c = m.coefficients
    assert c == 0 and a >= 0 and b > 0


def test_window_adapts_when_costs_change():
    rng = random.Random(5)
    m = StepCostModel(window=256)
    old, new = (4e-3, 1.5e-4, 2e-6), (8e-3, 4e-4, 1e-6)
    feed(m, rng, old, 400)
    assert close(m.coefficients[1], old[1], 0.05)
    feed(m, rng, new, 100)
    mid = m.coefficients[1]
    assert old[1] < mid < new[1]  # moving towards the new costs
    feed(m, rng, new, 256)  # the window now holds only new-cost steps
    a, b, c = m.coefficients
    assert close(a, new[0], 0.15) and close(b, new[1], 0.05) and close(c, new[2], 0.15), m.coefficients


def test_lazy_resolve():
    rng = random.Random(6)
    m = StepCostModel(resolve_every=8)
    feed(m, rng, (1e-3, 1e-4, 1e-6), 16)
    assert m.coefficients is not None
    solves = m.num_solves
    feed(m, rng, (1e-3, 1e-4, 1e-6), 7)
    m.predict(1, 1)
    assert m.num_solves == solves  # 7 < resolve_every: not re-solved
    feed(m, rng, (1e-3, 1e-4, 1e-6), 1)
    m.predict(1, 1)
    m.predict(2, 2)
    assert m.num_solves == solves + 1


def test_window_without_spread_keeps_earlier_slope():
    rng = random.Random(7)
    coef = (4e-3, 1.5e-4, 2e-6)
    m = StepCostModel(window=64)
    feed(m, rng, coef, 64, noise=0.0)
    for k in range(200):  # then only 32-decode steps: tokens constant, context growing
        ctx = 32 * (100 + k)
        m.observe(32, ctx, coef[0] + coef[1] * 32 + coef[2] * ctx)
    for got, want in zip(m.coefficients, coef):
        assert close(got, want, 0.02)


def test_outliers_are_clipped():
    rng = random.Random(8)
    coef = (4e-3, 1.5e-4, 2e-6)
    m = StepCostModel()
    feed(m, rng, coef, 64, noise=0.0)
    m.observe(10, 1000, 5.0)  # a 5 s hiccup, 700x the prediction; unclipped it would add ~70 ms
    feed(m, rng, coef, 8, noise=0.0)
    assert close(m.predict(10, 1000), coef[0] + coef[1] * 10 + coef[2] * 1000, 0.15)


def test_initial_coefficients_and_max_new_tokens():
    m = StepCostModel(coefficients=(0.01, 0.001, 0.0001))
    assert m.calibrated and m.coefficients == (0.01, 0.001, 0.0001)
    assert m.predict(10, 100) == pytest.approx(0.01 + 0.01 + 0.01)
    # step so far: 10 tokens, 100 context; a chunk of n tokens from position 50 adds
    # 0.001 n + 0.0001 (50 + n)
    for budget in (0.0, 0.03, 0.035, 0.05, 0.5):
        n = m.max_new_tokens(budget, 10, 100, 50, 1000)
        assert 0 <= n <= 1000
        if n:
            assert m.predict(10 + n, 150 + n) <= budget
        if n < 1000:
            assert m.predict(10 + n + 1, 150 + n + 1) > budget
    assert m.max_new_tokens(0.5, 10, 100, 50, 7) == 7
    assert m.max_new_tokens(0.001, 0, 0, 0, 5) == 0  # even an empty step costs a
    with pytest.raises(ValueError):
        StepCostModel(coefficients=(0.01, -1.0, 0.0))


def test_warm_up_outlier_before_calibration_is_clipped():
    coef = (4e-3, 1.5e-4, 2e-6)
    want = coef[0] + coef[1] * 10 + coef[2] * 1000
    errs = []
    for factor in (3.0, 0.0):  # 0: no clipping
        m = StepCostModel(outlier_factor=factor)
        m.observe(10, 1000, 2.0)  # the first step: 2 s of warm-up, 270x a normal one
        feed(m, random.Random(9), coef, 100, noise=0.0)
        errs.append(abs(m.predict(10, 1000) - want) / want)
    assert errs[0] < 0.1 and errs[1] > 1.0, errs


def test_adapts_to_a_large_real_slowdown_despite_clipping():
    rng = random.Random(10)
    old = (4e-3, 1.5e-4, 2e-6)
    new = tuple(10 * x for x in old)  # e.g. the node got 10x slower: not outliers any more
    m = StepCostModel(window=256)
    feed(m, rng, old, 300)
    feed(m, rng, new, 100)
    assert m.coefficients[1] > 1.5 * old[1]  # on its way up (clipped at 3x the prediction)
    feed(m, rng, new, 350)  # the clipped steps have left the window
    for got, want in zip(m.coefficients, new):
        assert close(got, want, 0.2), m.coefficients

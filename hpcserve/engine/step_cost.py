"""Online model of one engine step's wall time. Pure Python: no torch, no numpy.

Model::

    t ≈ a + b·num_tokens + c·context_tokens

- ``num_tokens``: tokens computed in the step (prefill chunk tokens, plus 1 per decode);
  the GEMM work.
- ``context_tokens``: sum over the step's sequences of their context length *after*
  the step (``start_pos + num_new_tokens``, i.e. ``ScheduledSeq.context_len``); the
  attention / KV-read work.
- ``a``: fixed per-step cost (Python, scheduling, launch overheads, LM head floor).

Lifecycle: the engine owns one ``StepCostModel``. After every non-empty step it calls
``observe(num_tokens, context_tokens, seconds)`` with the measured wall time of the
whole step (schedule + execute + update). The scheduler calls ``predict`` and
``max_new_tokens`` while building a step. Until the model is *calibrated* (at least
``min_samples`` observations whose ``num_tokens`` are not all equal, or initial
``coefficients`` given) ``predict`` returns None and callers must not cap anything.

Fit: least squares over the last ``window`` observations with a small ridge term
(``ridge``, relative to the sample count, on the scaled ``b`` and ``c`` terms), pulled
towards the previous coefficients, so a window without spread (e.g. only decode steps
of one batch size) keeps what earlier windows established instead of drifting. It is
re-solved lazily: when the coefficients are next needed (``predict``, or ``observe``'s
outlier check) and ``resolve_every`` observations arrived since the last solve. Coefficients are non-negative: if the full fit has a
negative term, the best fit over fewer terms (the others fixed at 0) is used, which
is the exact non-negative least-squares solution. Observations above
``outlier_factor`` × the prediction (a GC pause, a warm-up step) are clipped to that
bound: on arrival once calibrated, and those already in the window after each solve
(then the fit is redone, a few times at most). So a real slowdown beyond that factor
is learned within about one window plus a few re-solves.

Interface:

- ``StepCostModel(window=256, min_samples=8, resolve_every=8, ridge=1e-3,
  outlier_factor=3.0, coefficients=None)``
- ``observe(num_tokens, context_tokens, seconds)``
- ``predict(num_tokens, context_tokens) -> float | None``
- ``max_new_tokens(budget_s, num_tokens, context_tokens, start_pos, limit) -> int``:
  the largest ``n`` in ``[0, limit]`` such that adding one sequence chunk of ``n``
  tokens starting at ``start_pos`` to a step of (``num_tokens``, ``context_tokens``)
  keeps ``predict`` within ``budget_s``; ``limit`` when not calibrated.
- ``coefficients -> (a, b, c) | None``, ``calibrated``, ``num_samples``.
"""

from __future__ import annotations

import math
from collections import deque

# term subsets tried when the full fit has a negative coefficient (a, b, c)
_SUBSETS = ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,))


class StepCostModel:
    def __init__(
        self,
        window: int = 256,
        min_samples: int = 8,
        resolve_every: int = 8,
        ridge: float = 1e-3,
        outlier_factor: float = 3.0,
        coefficients: tuple[float, float, float] | None = None,
    ) -> None:
        if window < 3 or min_samples < 3 or resolve_every < 1 or ridge < 0:
            raise ValueError("need window >= 3, min_samples >= 3, resolve_every >= 1, ridge >= 0")
        self.window = window
        self.min_samples = min(min_samples, window)
        self.resolve_every = resolve_every
        self.ridge = ridge
        self.outlier_factor = outlier_factor
        self._obs: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None
        if coefficients is not None:
            if len(coefficients) != 3 or any(not math.isfinite(x) or x < 0 for x in coefficients):
                raise ValueError(f"coefficients must be 3 finite values >= 0, got {coefficients!r}")
            self._coef = tuple(float(x) for x in coefficients)
        self._pending = 0  # observations since the last solve
        self.num_solves = 0

    # ------------------------------------------------------------ input
    def observe(self, num_tokens: int, context_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or context_tokens < 0 or not math.isfinite(seconds) or seconds < 0:
            return
        if self.outlier_factor > 0 and self.coefficients is not None:
            bound = self.outlier_factor * self._predict(num_tokens, context_tokens)
            if bound > 0:
                seconds = min(seconds, bound)
        self._obs.append((float(num_tokens), float(context_tokens), float(seconds)))
        self._pending += 1

    # ----------------------------------------------------------- output
    @property
    def num_samples(self) -> int:
        return len(self._obs)

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(a, b, c) in seconds, seconds/token, seconds/context token; None if not calibrated."""
        self._maybe_solve()
        return self._coef

    @property
    def calibrated(self) -> bool:
        return self.coefficients is not None

    def predict(self, num_tokens: int, context_tokens: int) -> float | None:
        if self.coefficients is None:
            return None
        return self._predict(num_tokens, context_tokens)

    def max_new_tokens(self, budget_s: float, num_tokens: int, context_tokens: int, start_pos: int, limit: int) -> int:
        coef = self.coefficients
        if coef is None or limit <= 0:
            return max(0, limit)
        a, b, c = coef
        room = budget_s - a - b * num_tokens - c * (context_tokens + start_pos)
        if room < 0:
            return 0
        q = math.inf if b + c <= 0 else room / (b + c)
        n = limit if q >= limit else int(q) + 1
        # exact check against predict (rounding): the answer must satisfy predict <= budget
        while n > 0 and self._predict(num_tokens + n, context_tokens + start_pos + n) > budget_s:
            n -= 1
        return n

    def _predict(self, num_tokens: float, context_tokens: float) -> float:
        a, b, c = self._coef
        return a + b * num_tokens + c * context_tokens

    # -------------------------------------------------------------- fit
    def _maybe_solve(self) -> None:
        obs = self._obs
        if self._coef is None:
            if len(obs) < self.min_samples or min(o[0] for o in obs) == max(o[0] for o in obs):
                return
        elif self._pending < self.resolve_every or len(obs) < self.min_samples:
            return
        self._coef = self._solve()
        for _ in range(4 if self.outlier_factor > 0 else 0):
            # clip outliers already in the window (a warm-up step skews the first fit), refit
            bounds = [self.outlier_factor * self._predict(n, ctx) for n, ctx, _ in obs]
            if not any(0 < b < y for b, (_, _, y) in zip(bounds, obs)):
                break
            clipped = [(n, ctx, min(y, b) if b > 0 else y) for b, (n, ctx, y) in zip(bounds, obs)]
            obs.clear()
            obs.extend(clipped)
            self._coef = self._solve()
        self._pending = 0
        self.num_solves += 1

    def _solve(self) -> tuple[float, float, float]:
        obs = self._obs
        m = len(obs)
        sn = math.sqrt(sum(o[0] * o[0] for o in obs) / m) or 1.0
        sc = math.sqrt(sum(o[1] * o[1] for o in obs) / m) or 1.0
        scale = (1.0, sn, sc)
        g = [[0.0] * 3 for _ in range(3)]  # Gram matrix of the scaled features (1, n/sn, ctx/sc)
        r = [0.0] * 3
        for n, ctx, y in obs:
            x = (1.0, n / sn, ctx / sc)
            for i in range(3):
                r[i] += x[i] * y
                for j in range(3):
                    g[i][j] += x[i] * x[j]
        prior = [0.0] * 3 if self._coef is None else [self._coef[i] * scale[i] for i in range(3)]
        lam = [0.0, self.ridge * m, self.ridge * m]  # intercept not penalized
        best, best_obj = None, math.inf
        for terms in _SUBSETS:
            mat = [[g[i][j] + (lam[i] if i == j else 0.0) for j in terms] for i in terms]
            rhs = [r[i] + lam[i] * prior[i] for i in terms]
            sol = _solve_linear(mat, rhs)
            if sol is None or min(sol) < -1e-12 * max(1.0, max(abs(v) for v in sol)):
                continue
            theta = [0.0] * 3
            for i, v in zip(terms, sol):
                theta[i] = max(0.0, v)
            # objective up to the constant sum(y^2): |X theta - y|^2 + sum lam (theta - prior)^2
            obj = sum(theta[i] * g[i][j] * theta[j] for i in range(3) for j in range(3))
            obj -= 2 * sum(theta[i] * r[i] for i in range(3))
            obj += sum(lam[i] * (theta[i] - prior[i]) ** 2 for i in range(3))
            if obj < best_obj:
                best, best_obj = theta, obj
        assert best is not None  # single-term fits of non-negative data are always feasible
        return (best[0], best[1] / sn, best[2] / sc)


def _solve_linear(mat: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting (k <= 3); None if singular."""
    k = len(rhs)
    a = [row[:] + [v] for row, v in zip(mat, rhs)]
    norm = max((abs(x) for row in mat for x in row), default=0.0)
    if norm == 0:
        return None
    for col in range(k):
        piv = max(range(col, k), key=lambda i: abs(a[i][col]))
        if abs(a[piv][col]) <= 1e-12 * norm:
            return None
        a[col], a[piv] = a[piv], a[col]
        for i in range(col + 1, k):
            f = a[i][col] / a[col][col]
            for j in range(col, k + 1):
                a[i][j] -= f * a[col][j]
    x = [0.0] * k
    for i in range(k - 1, -1, -1):
        x[i] = (a[i][k] - sum(a[i][j] * x[j] for j in range(i + 1, k))) / a[i][i]
    return x

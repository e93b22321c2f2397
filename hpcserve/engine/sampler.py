"""Turn a batch of logits into one token per row (torch).

Interface::

    sampler = Sampler(seed=None)            # one per model runner
    out = sampler(logits, params, generators)
    out.token_ids  -> list[int]              # one per row
    out.logprobs   -> list[TokenLogprob | None]

``logits`` is ``[B, V]`` in any float dtype (computed in float32). Row ``i`` uses
``params[i]`` and ``generators[i]``.

Lifecycle: the engine creates ``torch.Generator().manual_seed(seed)`` once for each
request that has a ``seed`` and passes the same object at every step; other rows pass
``None`` and draw from the sampler-owned default generator. A seeded row's sample
depends only on its own logits and its own generator, never on the rest of the batch.

Per sampled row, in order: temperature scaling -> top-k -> top-p (smallest set whose
cumulative probability reaches ``top_p``; the top token is always kept) -> min-p (drop
tokens with prob < ``min_p`` * max prob) -> sample by inverse CDF with one uniform
drawn from the row's generator (each step advances a seeded generator by exactly one
draw, whatever the batch). Each filter is a per-row logit cutoff found with ``topk`` (no
full-vocab sort unless a top-p-only nucleus is wider than ``CANDIDATES``); tokens tied
with a cutoff are kept, so the result never depends on tie order or batch composition.
Greedy rows take the argmax. Logprobs, when asked for, are ``log_softmax`` of the *raw* logits (before
temperature and filters), as the OpenAI API reports them.

Fast path: when every row is greedy and none wants logprobs, the whole call is one
``argmax`` and one ``tolist``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcserve.engine.request import SamplingParams, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # None for rows whose params.logprobs is None


class Sampler:
    CANDIDATES = 256  # top-p-only rows first look for the nucleus among this many tokens

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SamplerOutput:
        n = len(params)
        # Hot path: all greedy, no logprobs -> one argmax, no per-row tensor work.
        if all(p.is_greedy and p.logprobs is None for p in params):
            return SamplerOutput(logits.argmax(-1).tolist(), [None] * n)

        x = logits.float()
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(sampled) == n:
            chosen = self._sample(x, params, generators)
        else:
            chosen = x.argmax(-1)
            if sampled:
                rows = [params[i] for i in sampled]
                gens = [generators[i] for i in sampled]
                chosen[sampled] = self._sample(x[sampled], rows, gens)
        token_ids = chosen.tolist()
        return SamplerOutput(token_ids, self._logprobs(x, chosen, params, token_ids))

    # sampling ------------------------------------------------------------------
    def _sample(
        self,
        x: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token per row of ``x`` ([S, V] float32); all rows are non-greedy."""
        probs = torch.softmax(self.filter_logits(x, params), dim=-1)
        # Inverse CDF: one uniform per row. The first index whose cdf exceeds u * total
        # always has prob > 0 (the cdf is a sequential sum, so it only rises there).
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(
            self._uniforms(generators).to(x.device) * total,
            torch.nextafter(total, torch.zeros_like(total)),
        )
        return torch.searchsorted(cdf, target, right=True).squeeze(1)

    def filter_logits(self, x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature-scaled float32 logits with filtered-out tokens at -inf (non-greedy rows)."""
        x = x.float()
        s, v = x.shape
        dev = x.device
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        x = x / temps.unsqueeze(1)

        # Every filter reduces to a per-row logit cutoff: keep tokens with logit >= cut.
        cut = torch.full((s, 1), float("-inf"), device=dev)
        ks = [p.top_k if 0 < p.top_k < v else v for p in params]  # v = disabled
        rows = [i for i, p in enumerate(params) if ks[i] < v or p.top_p < 1.0]
        if rows:
            sub = x if len(rows) == s else x[rows]
            rk = [ks[i] for i in rows]
            rp = [params[i].top_p for i in rows]
            n = max((k for k in rk if k < v), default=1)
            if v in rk:  # a top-p-only row: first try the nucleus among the best candidates
                n = max(n, self.CANDIDATES)
            c, more = self._cutoffs(sub, rk, rp, min(n, v))
            if more:  # nucleus wider than the candidates: redo those rows over the whole vocab
                c[more] = self._cutoffs(sub[more], [v] * len(more), [rp[i] for i in more], v)[0]
            cut[rows] = c

        min_ps = [p.min_p for p in params]
        use_min_p = any(mp > 0 for mp in min_ps)
        if not rows and not use_min_p:
            return x
        if use_min_p:
            # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p). Renormalising
            # after top-k/top-p does not change the ratio, so the order does not matter.
            mp_t = torch.tensor(min_ps, dtype=torch.float32, device=dev).unsqueeze(1)
            cut = torch.maximum(cut, x.max(dim=-1, keepdim=True).values + torch.log(mp_t))

        return x.masked_fill(x < cut, float("-inf"))

    @staticmethod
    def _cutoffs(
        x: torch.Tensor, ks: list[int], ps: list[float], n: int
    ) -> tuple[torch.Tensor, list[int]]:
        """Top-k/top-p logit cutoffs ``[R, 1]`` from each row's ``n`` best logits.

        Also returns the rows whose nucleus may extend past the ``n`` candidates. The
        result depends only on each row's values (not on ``n`` or on how ties are
        ordered), so a seeded row samples the same whatever else is in the batch; tokens
        tied with the cutoff are kept.
        """
        v = x.shape[1]
        vals = torch.topk(x, n, dim=-1).values  # best first
        k_t = torch.tensor(ks, device=x.device).unsqueeze(1)
        n_keep = k_t.clamp(max=n)
        more: list[int] = []
        if any(p < 1.0 for p in ps):
            pos = torch.arange(n, device=x.device).unsqueeze(0)
            e = torch.exp(vals - vals[:, :1]).masked_fill(pos >= k_t, 0.0)  # unnormalised probs
            cum = torch.cumsum(e, dim=-1)
            has_k = k_t < v
            total = cum[:, -1:]
            if not bool(has_k.all()):  # top-p without top-k: normalise over the whole row
                full = torch.exp(x - vals[:, :1]).sum(dim=-1, keepdim=True)
                total = torch.where(has_k, total, full)
            before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
            p_t = torch.tensor([p if p < 1.0 else 2.0 for p in ps], device=x.device).unsqueeze(1)
            # keep the smallest prefix whose mass reaches top_p; always keep the top token
            within = (before < p_t * total).sum(dim=-1, keepdim=True).clamp(min=1)
            n_keep = torch.minimum(n_keep, within)
            if n < v:
                flag = (within >= n) & ~has_k & (p_t < 1.0)
                more = flag.squeeze(1).nonzero().squeeze(1).tolist()
        return vals.gather(1, n_keep - 1), more

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``[S, 1]`` U[0, 1): row i from generators[i], else the default generator."""
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            return torch.rand((len(generators), 1), generator=self.generator)
        u = torch.empty((len(generators), 1))
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand(1, generator=g)
        if unseeded:
            u[unseeded] = torch.rand((len(unseeded), 1), generator=self.generator)
        return u

    # logprobs ------------------------------------------------------------------
    @staticmethod
    def _logprobs(
        x: torch.Tensor,
        chosen: torch.Tensor,
        params: list[SamplingParams],
        token_ids: list[int],
    ) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return out
        lsm = torch.log_softmax(x[want], dim=-1)
        chosen_lp = lsm.gather(1, chosen[want].unsqueeze(1)).squeeze(1).tolist()
        kmax = min(max(params[i].logprobs for i in want), lsm.shape[1])
        top_vals: list[list[float]] = [[] for _ in want]
        top_ids: list[list[int]] = [[] for _ in want]
        if kmax > 0:
            vals, ids = torch.topk(lsm, kmax, dim=-1)
            top_vals, top_ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(want):
            k = params[i].logprobs
            out[i] = TokenLogprob(
                token_id=token_ids[i],
                logprob=chosen_lp[j],
                top=list(zip(top_ids[j][:k], top_vals[j][:k])),
            )
        return out

"""``hpcserve bench disagg``: the pure half. Workload, per-mode metrics, the handoff latency table,
parity, targets and the report; no processes, no gRPC, no torch (the daemon-driving half is
``hpcserve.bench.disagg_run``).

One benchmark (driven by ``disagg_run.run_disagg``)::

    parity_prompts(...)                  the same prompts, greedy, in both daemons, before the load
    long_prompt_workload(...)            Poisson arrivals of long prompts over the window
    stream_prompt(seed, slot, n, ...)    the n-th request of stream slot ``slot`` (closed loop)
    per mode: RequestRecord per request -> mode_metrics(records, window_start, window_s, SLOs)
    compare_parity(colocated, disaggregated), handoff_samples(...) -> handoff_table(...)
    evaluate_targets(...), render_table(result)

Load of one mode (from --seed: the same arrival times and lengths in both modes, token ids of each
mode's own; lengths are token counts, inclusive):

- ``--streams`` stream slots (``STREAM_PROMPT_LEN`` prompt, ``STREAM_OUTPUT_LEN`` tokens each): every
  slot sends a request at the window start and the next one when the previous ends, until the window
  closes, so the decode load is there for the whole window; their inter-token gaps give the ITL;
- long prompts (``LONG_PROMPT_LEN`` prompt, ``LONG_OUTPUT_LEN`` tokens) arrive as a Poisson process at
  ``--rate`` per second during the window: the prefill-heavy load.

All are interactive ``Complete`` requests with token-id prompts, temperature 0, EOS ignored; token ids
uniform in [100, vocab - 100) (``mixed.measured_ids``: never starting with the id that starts the
parity prompts, so the load shares no prefix-cache block with them), lengths clipped to the served
context (``mixed.fit_lengths``). Definitions of the numbers: ``mode_metrics``, ``handoff_table`` and
bench/README.md.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hpcserve.bench import mixed
from hpcserve.bench.mixed import ChatRecord, fit_lengths, itl_gaps, measured_ids, meets_slo, percentile, unmeasured_ids

STREAM_PROMPT_LEN = (16, 32)
STREAM_OUTPUT_LEN = 128
LONG_PROMPT_LEN = (512, 1024)
LONG_OUTPUT_LEN = 16
PARITY_PROMPT_LENS = (1, 2, 3, 5, 8, 13, 20, 48, 96, 160, 256, 384, 512, 640)
PARITY_OUTPUT_LEN = 16
HANDOFF_BUCKETS = (2, 16, 64, 256, 512, 768, 1024)  # bucket edges (prompt tokens); the last is open
TRANSFER_TOKENS = (512, 2048)  # prompt lengths of the raw handoff-vs-MPI benchmark

HANDOFF_RATIO_MIN = 0.8  # target: KV handoff bandwidth >= 0.8x raw MPI Send/Recv of the same bytes
MODES = ("colocated", "disaggregated")
STREAM, LONG, PARITY = "stream", "long", "parity"
MIB, GIB = float(1 << 20), float(1 << 30)


# ------------------------------------------------------------------------------------ workload

@dataclass(frozen=True)
class Arrival:
    index: int
    at_s: float                 # offset from the window start
    prompt_ids: tuple[int, ...]
    max_tokens: int


def long_prompt_workload(seed: int, rate: float, duration_s: float, vocab_size: int,
                         max_model_len: int | None = None, *, mode: str) -> list[Arrival]:
    """Poisson arrivals (exponential gaps at ``rate``/s) in [0, duration_s) of long prompts. Times and
    lengths come from one generator (``seed``: the same in both modes), each prompt's ids from its
    own (``seed``, ``mode`` and its index), so clipping keeps the schedule."""
    rng = random.Random(f"hpcserve-bench-disagg-long-{seed}")
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        p, o = fit_lengths(rng.randint(*LONG_PROMPT_LEN), LONG_OUTPUT_LEN, max_model_len)
        ids = measured_ids(random.Random(f"hpcserve-bench-disagg-long-{mode}-{seed}-{len(out)}"), p, vocab_size)
        out.append(Arrival(len(out), t, ids, o))
        t += rng.expovariate(rate)
    return out


def stream_prompt(seed: int, slot: int, n: int, vocab_size: int, max_model_len: int | None = None, *,
                  mode: str) -> tuple[tuple[int, ...], int]:
    """``(prompt ids, max_tokens)`` of the ``n``-th request of stream slot ``slot``: the same length in
    both modes however many requests a slot gets through, token ids of the mode's own."""
    p, o = fit_lengths(random.Random(f"hpcserve-bench-disagg-stream-{seed}-{slot}-{n}").randint(*STREAM_PROMPT_LEN),
                       STREAM_OUTPUT_LEN, max_model_len)
    return measured_ids(random.Random(f"hpcserve-bench-disagg-stream-{mode}-{seed}-{slot}-{n}"), p, vocab_size), o


def parity_prompts(seed: int, vocab_size: int, max_model_len: int | None = None) -> list[tuple[tuple[int, ...], int]]:
    """One prompt per ``PARITY_PROMPT_LENS`` entry (clipped to the context), ``PARITY_OUTPUT_LEN`` tokens;
    the same in both modes (parity compares their outputs). They are unmeasured prompts
    (``mixed.unmeasured_ids``): no load prompt shares a prefix-cache block with them."""
    out = []
    for i, n in enumerate(PARITY_PROMPT_LENS):
        p, o = fit_lengths(n, PARITY_OUTPUT_LEN, max_model_len)
        out.append((unmeasured_ids(f"disagg-parity-{seed}-{i}", p, vocab_size), o))
    return out


# ------------------------------------------------------------------------------------- records

@dataclass
class RequestRecord(ChatRecord):
    """One request as the client saw it: ``ChatRecord`` (arrival, chunk times, error) plus what this
    benchmark needs. ``metrics`` is the last chunk's ``RequestMetrics`` as a dict (None if it never came)."""
    kind: str = LONG
    key: str = ""            # the same request in both modes has the same key ("long-3", "stream-0-2")
    prompt_len: int = 0
    token_ids: list[int] = field(default_factory=list)
    metrics: dict | None = None

    @property
    def last_token_s(self) -> float | None:
        times = self.times
        return times[-1] if times else None


def gaps_until(times: Sequence[float], end: float) -> list[float]:
    """Inter-token gaps whose later token arrived at or before ``end``."""
    return [g for g, t in zip(itl_gaps(times), times[1:]) if t <= end]


def load_end(records: Iterable[RequestRecord], window_end: float) -> float:
    """When the prefill-heavy load was over: the later of the window's end and the last token of the
    last long prompt (a backlog of prompts still competes with the streams after the window)."""
    ends = [r.last_token_s for r in records if r.kind == LONG and r.last_token_s is not None]
    return max([window_end, *ends])


def mode_metrics(records: Sequence[RequestRecord], window_start: float, window_s: float,
                 ttft_slo_s: float, itl_slo_s: float) -> dict:
    """One mode's numbers (``records``: the load's requests, all sent inside the window):

    - ``itl_p50_s``/``itl_p99_s``: percentiles of the inter-token gaps of the stream requests
      (finished without error), pooled, counting a gap if its later token arrived by ``load_end``;
    - ``ttft_*``: time from a request's send (scheduled arrival for long prompts) to its first token,
      per kind, over requests without error;
    - ``goodput``: requests that finished without error, with TTFT <= ``ttft_slo_s`` and their own
      p99 ITL <= ``itl_slo_s`` (``mixed.meets_slo``), per second of the window; ``slo_attainment``:
      their fraction of all requests (failed ones count as misses);
    - ``num_cached_tokens``: prompt tokens of the load served from the prefix cache (``usage.cached_tokens``
      of each request's last chunk).
    """
    end = load_end(records, window_start + window_s)
    streams = [r for r in records if r.kind == STREAM]
    longs = [r for r in records if r.kind == LONG]
    gaps = [g for r in streams if r.error is None for g in gaps_until(r.times, end)]
    good_ids = {id(r) for r in records if meets_slo(r, ttft_slo_s, itl_slo_s)}

    def attainment(rs):
        return sum(id(r) in good_ids for r in rs) / len(rs) if rs else None

    def ttfts(rs):
        return [r.ttft_s for r in rs if r.ttft_s is not None]

    return {
        "window_s": window_s,
        "load_end_s": end - window_start,
        "num_stream_requests": len(streams),
        "num_long_requests": len(longs),
        "num_failed": sum(r.error is not None for r in records),
        "num_itl_gaps": len(gaps),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "itl_max_s": max(gaps) if gaps else None,
        "stream_ttft_p50_s": percentile(ttfts(streams), 50),
        "stream_ttft_p99_s": percentile(ttfts(streams), 99),
        "long_ttft_p50_s": percentile(ttfts(longs), 50),
        "long_ttft_p99_s": percentile(ttfts(longs), 99),
        "goodput": len(good_ids) / window_s,
        "num_good": len(good_ids),
        "slo_attainment": attainment(records),
        "stream_slo_attainment": attainment(streams),
        "long_slo_attainment": attainment(longs),
        "chat_ttft_slo_s": ttft_slo_s,
        "chat_itl_slo_s": itl_slo_s,
        "num_cached_tokens": sum(r.cached_tokens for r in records),
        **handoff_counts(records),
    }


# ------------------------------------------------------------------------------------- handoff

def handoff_counts(records: Iterable[RequestRecord]) -> dict:
    """How many requests of 2+ prompt tokens there were, how many were handed off (``disaggregated``)
    and how many handoffs failed; requests without metrics count as not handed off."""
    eligible = [r for r in records if r.prompt_len >= 2 and r.error is None]
    m = [r.metrics or {} for r in eligible]
    return {"num_handoff_eligible": len(eligible),
            "num_disaggregated": sum(bool(x.get("disaggregated")) for x in m),
            "num_handoff_failed": sum(bool(x.get("kv_handoff_failed")) for x in m)}


def handoff_samples(records: Iterable[RequestRecord]) -> list[dict]:
    """Per request handed off successfully: prompt length, ``kv_handoff_s`` and bytes (prompt order)."""
    out = []
    for r in records:
        m = r.metrics or {}
        if r.error is None and m.get("disaggregated") and not m.get("kv_handoff_failed") and m.get("kv_handoff_s"):
            out.append({"prompt_tokens": r.prompt_len, "kv_handoff_s": m["kv_handoff_s"],
                        "kv_handoff_bytes": m.get("kv_handoff_bytes", 0)})
    return sorted(out, key=lambda s: s["prompt_tokens"])


def handoff_table(samples: Sequence[Mapping], edges: Sequence[int] = HANDOFF_BUCKETS) -> list[dict]:
    """Samples bucketed by prompt length ``[edges[i], edges[i+1])`` (the last bucket is open; shorter
    prompts than ``edges[0]`` are dropped); per non-empty bucket: count, median and p90 of
    ``kv_handoff_s``, median MiB, and GiB/s = the bucket's bytes / its summed handoff seconds."""
    rows = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        b = [s for s in samples if s["prompt_tokens"] >= lo and (hi is None or s["prompt_tokens"] < hi)]
        if not b:
            continue
        secs = [s["kv_handoff_s"] for s in b]
        total_s = sum(secs)
        rows.append({"prompt_tokens": [lo, None if hi is None else hi - 1], "count": len(b),
                     "median_s": percentile(secs, 50), "p90_s": percentile(secs, 90),
                     "median_mib": percentile([s["kv_handoff_bytes"] / MIB for s in b], 50),
                     "gib_s": sum(s["kv_handoff_bytes"] for s in b) / GIB / total_s if total_s > 0 else None})
    return rows


# -------------------------------------------------------------------------------------- parity

def compare_parity(colocated: Sequence[Sequence[int] | None], disaggregated: Sequence[Sequence[int] | None],
                   prompt_lens: Sequence[int] | None = None) -> dict:
    """Greedy outputs of the same prompts in both modes (None: the request failed). ``parity`` is true
    when every prompt has an output in both and they are identical token for token."""
    if len(colocated) != len(disaggregated):
        raise ValueError(f"{len(colocated)} colocated outputs vs {len(disaggregated)} disaggregated")
    mismatches = []
    for i, (a, b) in enumerate(zip(colocated, disaggregated)):
        if a is None or b is None or list(a) != list(b):
            first = (None if a is None or b is None else
                     next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
            mismatches.append({"index": i, "prompt_tokens": prompt_lens[i] if prompt_lens else None,
                               "first_difference": first, "failed": a is None or b is None})
    return {"parity": bool(colocated) and not mismatches, "num_prompts": len(colocated),
            "num_identical": len(colocated) - len(mismatches), "mismatches": mismatches}


# ------------------------------------------------------------------------------------- targets

def evaluate_targets(handoff_ratio: float | None, itl_colocated: float | None, itl_disaggregated: float | None,
                     parity: bool | None) -> dict:
    """The three targets; ``passed`` is None when a number is missing."""
    itl_ok = None if itl_colocated is None or itl_disaggregated is None else itl_disaggregated <= itl_colocated
    return {
        "handoff_ratio": {"value": handoff_ratio, "min": HANDOFF_RATIO_MIN,
                          "passed": None if handoff_ratio is None else handoff_ratio >= HANDOFF_RATIO_MIN},
        "itl_p99": {"colocated": itl_colocated, "disaggregated": itl_disaggregated, "passed": itl_ok},
        "parity": {"value": parity, "passed": parity},
    }


def _verdict(passed) -> str:
    return "N/A " if passed is None else ("PASS" if passed else "FAIL")


def _f(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def target_lines(targets: Mapping) -> list[str]:
    h, itl, par = targets["handoff_ratio"], targets["itl_p99"], targets["parity"]
    return [
        f"{_verdict(h['passed'])} handoff_ratio >= {h['min']}: {_f(h['value'], '.3f')}",
        (f"{_verdict(itl['passed'])} itl_p99_s disaggregated <= colocated: "
         f"{_f(itl['disaggregated'], '.4f')} vs {_f(itl['colocated'], '.4f')}"),
        f"{_verdict(par['passed'])} parity (greedy outputs identical in both modes): "
        + ("-" if par["value"] is None else str(par["value"]).lower()),
    ]


_ROWS = (  # (key, label, format)
    ("num_stream_requests", "stream requests", "d"), ("num_long_requests", "long prompts", "d"),
    ("num_failed", "failed", "d"), ("itl_p50_s", "ITL p50 s", ".4f"), ("itl_p99_s", "ITL p99 s", ".4f"),
    ("itl_max_s", "ITL max s", ".4f"), ("stream_ttft_p50_s", "stream TTFT p50 s", ".3f"),
    ("long_ttft_p50_s", "long TTFT p50 s", ".3f"), ("long_ttft_p99_s", "long TTFT p99 s", ".3f"),
    ("slo_attainment", "SLO attainment", ".2f"), ("goodput", "goodput req/s", ".3f"),
    ("num_disaggregated", "handed off", "d"), ("num_handoff_failed", "handoff failed", "d"),
    ("num_cached_tokens", "cached prompt tok", "d"), ("load_end_s", "load end s", ".1f"),
)


def render_table(result: Mapping) -> str:
    """Handoff vs MPI, the per-mode table, the handoff latency table, parity, targets."""
    lines = [(f"KV handoff {_f(result['handoff_gib_s'], '.2f')} GiB/s vs raw MPI Send/Recv "
              f"{_f(result['mpi_raw_gib_s'], '.2f')} GiB/s: ratio {_f(result['handoff_ratio'], '.3f')}")]
    for r in (result.get("transfer_bench") or {}).get("results", []):
        lines.append(f"  {r['tokens']:>6} tokens {r['nbytes'] / MIB:8.1f} MiB: handoff {r['handoff_ms']:.1f} ms, "
                     f"raw {r['raw_ms']:.1f} ms, ratio {r['handoff_ratio']:.3f}")
    modes = result["modes"]
    lines += ["", f"{'prefill-heavy load':<18}" + "".join(f"{m:>15}" for m in MODES)]
    for key, label, spec in _ROWS:
        lines.append(f"{label:<18}" + "".join(f"{_f((modes.get(m) or {}).get(key), spec):>15}" for m in MODES))
    cfg = result.get("config", {})
    lines.append(mixed.slo_line(cfg) + "; goodput = requests meeting both per second of the window")
    lines += ["", "KV handoff latency vs prompt length (disaggregated run, receive side)",
              f"{'prompt tokens':<14}{'count':>6}{'median ms':>11}{'p90 ms':>10}{'median MiB':>12}{'GiB/s':>10}"]
    for row in result.get("handoff_latency") or []:
        lo, hi = row["prompt_tokens"]
        rng = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        lines.append(f"{rng:<14}{row['count']:>6}{_f(row['median_s'] and 1e3 * row['median_s'], '.2f'):>11}"
                     f"{_f(row['p90_s'] and 1e3 * row['p90_s'], '.2f'):>10}{_f(row['median_mib'], '.2f'):>12}"
                     f"{_f(row['gib_s'], '.3g'):>10}")
    lines.append("(kv_handoff_s includes waiting for the prefill replica to start sending; see bench/README.md)"
                 if result.get("handoff_latency") else "(no successful handoff)")
    par = result.get("parity_detail") or {}
    lines += ["", (f"parity: {par.get('num_identical')}/{par.get('num_prompts')} prompts identical; "
                   f"disaggregated daemon handed off {par.get('num_disaggregated')}/"
                   f"{par.get('num_handoff_eligible')} parity prompts of 2+ tokens")]
    lines += target_lines(result["targets"])
    return "\n".join(lines + mixed.config_lines(cfg))


# -------------------------------------------------------------------------------------- config

def daemon_config(user_doc: Mapping | None, ttft_slo_s: float, itl_slo_s: float, roles: str,
                  num_threads: int | None = None) -> dict:
    """The user's site TOML (parsed) with the SLO keys, ``disagg.roles`` and no dedicated chat split;
    ``engine.num-threads`` set to ``num_threads`` unless the user's file sets it (``mixed.daemon_config``)."""
    doc = mixed.daemon_config(user_doc, ttft_slo_s, itl_slo_s, 0, num_threads=num_threads)
    doc.setdefault("disagg", {})["roles"] = roles
    return doc


def kv_dtype(itemsize: float | None) -> str:
    """The KV cache dtype from its observed bytes per element (float32 when unknown)."""
    return "bfloat16" if itemsize is not None and round(itemsize) == 2 else "float32"

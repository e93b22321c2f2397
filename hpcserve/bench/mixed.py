"""``hpcserve bench mixed``: the pure half. Workload, metrics, targets and the table; no processes,
no gRPC, no torch (the daemon-driving half is ``hpcserve.bench.loadgen``).

Lifecycle of one benchmark (driven by ``loadgen.run_mixed``)::

    per mode: chat_workload(..., mode=m) / batch_workload(..., mode=m)   from --seed: the same arrival
              times and lengths in every mode, token ids of the mode's own
              ChatRecord per chat request (arrival + token arrival times, cached prompt tokens), two
              Snapshots of the replicas' cumulative counters (window start, window end)
              -> mode_metrics(records, start, end, ...) -> dict (one column of the table)
              + the economic utilization of the window, from the daemon's useful-work meter
                (two admin GetUsage snapshots -> daemon.utilization.window_utilization)
    evaluate_targets(modes) -> dict              the three targets of issue #4
    render_table(result) -> str                  the human-readable report

Workload (module constants; lengths are token counts, uniform and inclusive):

- chat: Poisson arrivals at --chat-rate over the window, each a ``Complete`` stream with a
  token-id prompt of ``CHAT_PROMPT_LEN`` tokens and ``CHAT_OUTPUT_LEN`` output tokens
  (ignore_eos, temperature 0);
- batch: ``/v1/completions`` lines, prompt ``BATCH_PROMPT_LEN`` tokens, max_tokens
  ``BATCH_OUTPUT_LEN`` (ignore_eos, temperature 0); line i is the same in every run of a seed.

Token ids are uniform in [100, vocab - 100) (``token_range``); a measured prompt never starts with
``reserved_first_id`` (the lowest of them), which starts every prompt that is not measured (warm-up,
SLO calibration, disagg's parity prompts; ``unmeasured_ids``), so the two never share a prefix-cache
block. If prompt + output exceeds the served context length, the output is first capped at half of
it and the prompt then shortened (``fit_lengths``).

Metric definitions are in ``mode_metrics`` and bench/README.md.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CHAT_PROMPT_LEN = (32, 256)
CHAT_OUTPUT_LEN = (32, 128)
BATCH_PROMPT_LEN = (64, 512)
BATCH_OUTPUT_LEN = (64, 256)
TOKEN_ID_MARGIN = 100  # token ids avoid the first and last 100 ids (special tokens live there)

MODES = ("chat_only", "batch_only", "shared", "split")
LATENCY_RATIO_MAX = 1.25   # target 1: shared p99 TTFT and ITL <= 1.25x chat_only
BATCH_RATIO_MIN = 0.85     # target 2: shared batch rate >= 0.85 x batch_only x (1 - chat share)
GOODPUT_RATIO_MIN = 1.3    # target 3: shared goodput >= 1.3x split goodput (and attainment not lower)

CHAT_FIELDS = ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "slo_attainment")


# ------------------------------------------------------------------------------------ workload

@dataclass(frozen=True)
class ChatArrival:
    index: int
    at_s: float                 # offset from the window start
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int


def token_range(vocab_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of the random prompt token ids; narrower margins for tiny vocabularies."""
    margin = min(TOKEN_ID_MARGIN, vocab_size // 4)
    return margin, max(margin + 1, vocab_size - margin)


def fit_lengths(prompt_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    """Clip ``(prompt, output)`` so that prompt + output <= max_model_len (None: no limit)."""
    if not max_model_len or prompt_len + output_len <= max_model_len:
        return prompt_len, output_len
    output_len = max(1, min(output_len, max_model_len // 2))
    return max(1, min(prompt_len, max_model_len - output_len)), output_len


def reserved_first_id(vocab_size: int) -> int:
    """The first token of every prompt that is not measured; no measured prompt starts with it."""
    return token_range(vocab_size)[0]


def measured_ids(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    """``n`` token ids uniform in ``token_range``, the first never ``reserved_first_id``."""
    lo, hi = token_range(vocab_size)
    if n <= 0:
        return ()
    first = rng.randrange(lo + 1 if hi - lo >= 2 else lo, hi)
    return (first, *(rng.randrange(lo, hi) for _ in range(n - 1)))


def unmeasured_ids(key: str, n: int, vocab_size: int) -> tuple[int, ...]:
    """A prompt that is not measured (warm-up, calibration, parity): ``reserved_first_id``, then ids
    from a generator seeded with ``key`` (distinct keys give prompts that share no full block)."""
    lo, hi = token_range(vocab_size)
    rng = random.Random(f"hpcserve-bench-unmeasured-{key}")
    return (lo, *(rng.randrange(lo, hi) for _ in range(n - 1)))[:max(n, 0)]


def chat_workload(seed: int, rate: float, duration_s: float, vocab_size: int, max_model_len: int | None = None,
                  *, mode: str) -> list[ChatArrival]:
    """Poisson arrivals (exponential gaps at ``rate``/s) in [0, duration_s), with their prompts. The
    times and lengths depend on ``seed`` only, the token ids on ``seed`` and ``mode``."""
    shape = random.Random(f"hpcserve-bench-mixed-chat-{seed}")
    ids = random.Random(f"hpcserve-bench-mixed-chat-{mode}-{seed}")
    out: list[ChatArrival] = []
    t = shape.expovariate(rate)
    while t < duration_s:
        p, o = fit_lengths(shape.randint(*CHAT_PROMPT_LEN), shape.randint(*CHAT_OUTPUT_LEN), max_model_len)
        out.append(ChatArrival(len(out), t, measured_ids(ids, p, vocab_size), o))
        t += shape.expovariate(rate)
    return out


def batch_workload(seed: int, num_lines: int, vocab_size: int, max_model_len: int | None = None, *, mode: str,
                   start: int = 0) -> list[BatchLine]:
    """Lines ``start .. start + num_lines - 1`` (``custom_id`` "line-i"): line i's lengths depend on
    ``seed`` and i, its token ids also on ``mode``; so any number of lines can be drawn in pieces."""
    out = []
    for i in range(start, start + num_lines):
        shape = random.Random(f"hpcserve-bench-mixed-batch-{seed}-{i}")
        p, o = fit_lengths(shape.randint(*BATCH_PROMPT_LEN), shape.randint(*BATCH_OUTPUT_LEN), max_model_len)
        ids = measured_ids(random.Random(f"hpcserve-bench-mixed-batch-{mode}-{seed}-{i}"), p, vocab_size)
        out.append(BatchLine(f"line-{i}", ids, o))
    return out


def batch_jsonl(lines: Iterable[BatchLine]) -> bytes:
    """OpenAI Batch JSONL (``/v1/completions``, token-id prompts, ignore_eos, greedy)."""
    return "".join(json.dumps({"custom_id": ln.custom_id, "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": list(ln.prompt_ids), "max_tokens": ln.max_tokens,
                                        "temperature": 0, "ignore_eos": True}}) + "\n"
                   for ln in lines).encode()


# ---------------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * min(max(p, 0.0), 100.0) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def token_times(chunks: Iterable[tuple[float, int]]) -> list[float]:
    """Arrival time of every token from ``(time, number of tokens)`` per received chunk: a chunk
    carrying k tokens gives k tokens at its time. Chunks without tokens are skipped."""
    out: list[float] = []
    for t, k in chunks:
        out.extend([t] * k)
    return out


def itl_gaps(times: Sequence[float]) -> list[float]:
    """Inter-token latencies: gaps between consecutive tokens (0 inside a multi-token chunk)."""
    return [b - a for a, b in itertools.pairwise(times)]


@dataclass
class ChatRecord:
    """One chat request as the client saw it (monotonic seconds)."""
    arrival_s: float                                         # when it was due to be sent
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (receive time, tokens)
    error: str | None = None                                 # set when the stream failed
    done: bool = False                                       # the stream ended (either way)
    cached_tokens: int = 0                                   # prompt tokens served from the prefix cache

    @property
    def times(self) -> list[float]:
        return token_times(self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(k for _, k in self.chunks)

    @property
    def ttft_s(self) -> float | None:
        times = self.times
        return times[0] - self.arrival_s if times and self.error is None else None

    @property
    def itls(self) -> list[float]:
        return itl_gaps(self.times) if self.error is None else []


def meets_slo(rec: ChatRecord, ttft_slo_s: float, itl_slo_s: float) -> bool:
    """Finished without error, TTFT <= ttft_slo_s and the request's own p99 ITL <= itl_slo_s
    (a request with a single token has no ITL and passes that half)."""
    if rec.error is not None or rec.ttft_s is None or rec.ttft_s > ttft_slo_s:
        return False
    p99 = percentile(rec.itls, 99)
    return p99 is None or p99 <= itl_slo_s


# ------------------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class ReplicaCounters:
    """Cumulative counters of one replica (``GetServerInfo().replicas[i]``)."""
    batch_tokens: int
    chat_tokens: int
    busy_s: float
    preemptions: int = 0


Snapshot = Mapping[int, ReplicaCounters]  # replica_id -> counters


def window_deltas(start: Snapshot, end: Snapshot, window_s: float) -> dict:
    """Tokens generated, busy fraction and preemptions between two snapshots. A counter that went
    down means the worker step was relaunched (counters restart): ValueError."""
    if set(start) != set(end):
        raise ValueError(f"the replicas changed during the window ({sorted(start)} -> {sorted(end)})")
    d = {rid: (end[rid].batch_tokens - start[rid].batch_tokens, end[rid].chat_tokens - start[rid].chat_tokens,
               end[rid].busy_s - start[rid].busy_s, end[rid].preemptions - start[rid].preemptions)
         for rid in start}
    if any(b < 0 or c < 0 or busy < -1e-9 for b, c, busy, _ in d.values()):
        raise ValueError("a replica's counters went down during the window: the worker ranks were relaunched")
    return {"batch_tokens": sum(v[0] for v in d.values()), "chat_tokens": sum(v[1] for v in d.values()),
            "busy_fraction": (sum(min(v[2] / window_s, 1.0) for v in d.values()) / len(d)) if d else 0.0,
            "preemptions": sum(v[3] for v in d.values())}


def mode_metrics(records: Sequence[ChatRecord], start: Snapshot, end: Snapshot, window_s: float,
                 ttft_slo_s: float, itl_slo_s: float, has_chat: bool, window_end: float | None = None,
                 batch_cached_tokens: int | None = None) -> dict:
    """One mode's metrics (the JSON keys; see bench/README.md):

    - latency: TTFT and pooled ITL percentiles over the chat requests that arrived in the window
      (failed requests have none); ``slo_attainment``: fraction of them that ``meets_slo``
      (failed ones count as misses). All null when the mode has no chat.
    - throughput from the replicas' counters over the window: ``batch_tokens_per_s``,
      ``chat_tokens_per_s``, ``total_tokens_per_s``, ``busy_fraction`` (mean over replicas of
      busy time / window);
    - ``goodput_tokens_per_s``: (batch tokens in the window + output tokens of the chat requests
      that met their SLO, received by ``window_end`` (None: all of them)) / window.
      ``economic_utilization`` (and ``_batch``, ``_interactive``) are filled in by the caller from
      the daemon's usage snapshots (``hpcserve.daemon.utilization.window_utilization``).
    - cached prompt tokens (served from the prefix cache, not computed): ``num_cached_tokens_chat``
      over the window's chat requests (``usage.cached_tokens`` of their last chunk),
      ``num_cached_tokens_batch`` as given (the batch lines answered in the window; None: unknown),
      ``num_cached_tokens`` their sum.
    """
    d = window_deltas(start, end, window_s)
    good = [r for r in records if meets_slo(r, ttft_slo_s, itl_slo_s)]
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    itls = [g for r in records for g in r.itls]
    chat = {"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_p50_s": percentile(itls, 50), "itl_p99_s": percentile(itls, 99),
            "slo_attainment": len(good) / len(records) if records else None}
    if not has_chat:
        chat = dict.fromkeys(CHAT_FIELDS)
    chat_cached = sum(r.cached_tokens for r in records)
    good_tokens = sum(r.num_tokens if window_end is None else sum(t <= window_end for t in r.times) for r in good)
    return {
        "window_s": window_s,
        "num_chat_requests": len(records),
        "num_chat_failed": sum(r.error is not None for r in records),
        **chat,
        "chat_ttft_slo_s": ttft_slo_s,
        "chat_itl_slo_s": itl_slo_s,
        "batch_tokens_per_s": d["batch_tokens"] / window_s,
        "chat_tokens_per_s": d["chat_tokens"] / window_s,
        "total_tokens_per_s": (d["batch_tokens"] + d["chat_tokens"]) / window_s,
        "busy_fraction": d["busy_fraction"],
        "goodput_tokens_per_s": (d["batch_tokens"] + good_tokens) / window_s,
        "goodput_chat_tokens": good_tokens,
        "economic_utilization": None,
        "num_preemptions": d["preemptions"],
        "num_cached_tokens": chat_cached + (batch_cached_tokens or 0),
        "num_cached_tokens_chat": chat_cached,
        "num_cached_tokens_batch": batch_cached_tokens,
    }


# ------------------------------------------------------------------------------------- targets

def _ratio(a, b):
    return a / b if a is not None and b else None


def evaluate_targets(modes: Mapping[str, Mapping]) -> dict:
    """Issue #4's three targets; ``passed`` is None when a needed number is missing."""
    c, b, s, sp = (modes.get(k) or {} for k in MODES)
    ttft_r, itl_r = _ratio(s.get("ttft_p99_s"), c.get("ttft_p99_s")), _ratio(s.get("itl_p99_s"), c.get("itl_p99_s"))
    lat = {"ttft_p99_ratio": ttft_r, "itl_p99_ratio": itl_r, "max_ratio": LATENCY_RATIO_MAX,
           "passed": None if ttft_r is None or itl_r is None else
           ttft_r <= LATENCY_RATIO_MAX and itl_r <= LATENCY_RATIO_MAX}
    share = c.get("busy_fraction")
    expected = (b.get("batch_tokens_per_s") * (1 - share)
                if b.get("batch_tokens_per_s") is not None and share is not None else None)
    batch_r = _ratio(s.get("batch_tokens_per_s"), expected)
    bat = {"chat_share": share, "expected_batch_tokens_per_s": expected, "ratio": batch_r,
           "min_ratio": BATCH_RATIO_MIN, "passed": None if batch_r is None else batch_r >= BATCH_RATIO_MIN}
    good_r = _ratio(s.get("goodput_tokens_per_s"), sp.get("goodput_tokens_per_s"))
    att_s, att_sp = s.get("slo_attainment"), sp.get("slo_attainment")
    gp = {"goodput_ratio": good_r, "min_ratio": GOODPUT_RATIO_MIN, "shared_slo_attainment": att_s,
          "split_slo_attainment": att_sp,
          "passed": None if good_r is None or att_s is None or att_sp is None else
          good_r >= GOODPUT_RATIO_MIN and att_s >= att_sp}
    return {"latency": lat, "batch_throughput": bat, "goodput": gp}


def _verdict(passed) -> str:
    return "N/A " if passed is None else ("PASS" if passed else "FAIL")


def _f(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return ("yes" if v else "no") if spec == "yn" else format(v, spec)


def target_lines(targets: Mapping) -> list[str]:
    lat, bat, gp = targets["latency"], targets["batch_throughput"], targets["goodput"]
    return [
        (f"{_verdict(lat['passed'])} (1) shared p99 latency <= {lat['max_ratio']}x chat_only: "
         f"TTFT {_f(lat['ttft_p99_ratio'], '.2f')}x, ITL {_f(lat['itl_p99_ratio'], '.2f')}x"),
        (f"{_verdict(bat['passed'])} (2) shared batch tok/s >= {bat['min_ratio']} x batch_only x (1 - chat share "
         f"{_f(bat['chat_share'], '.2f')}) = {_f(bat['expected_batch_tokens_per_s'], '.1f')}: "
         f"ratio {_f(bat['ratio'], '.2f')}"),
        (f"{_verdict(gp['passed'])} (3) shared goodput >= {gp['min_ratio']}x split, attainment not lower: "
         f"goodput {_f(gp['goodput_ratio'], '.2f')}x, attainment {_f(gp['shared_slo_attainment'], '.2f')} "
         f"vs {_f(gp['split_slo_attainment'], '.2f')}"),
    ]


_ROWS = (  # (key, label, format)
    ("num_chat_requests", "chat requests", "d"), ("num_chat_failed", "chat failed", "d"),
    ("ttft_p50_s", "TTFT p50 s", ".3f"), ("ttft_p99_s", "TTFT p99 s", ".3f"),
    ("itl_p50_s", "ITL p50 s", ".4f"), ("itl_p99_s", "ITL p99 s", ".4f"),
    ("slo_attainment", "SLO attainment", ".2f"), ("batch_tokens_per_s", "batch tok/s", ".1f"),
    ("chat_tokens_per_s", "chat tok/s", ".1f"), ("total_tokens_per_s", "total tok/s", ".1f"),
    ("busy_fraction", "busy fraction", ".2f"), ("goodput_tokens_per_s", "goodput tok/s", ".1f"),
    ("economic_utilization", "economic util.", ".2f"),
    ("economic_utilization_batch", " of it batch", ".2f"),
    ("economic_utilization_interactive", " of it chat", ".2f"), ("num_preemptions", "preemptions", "d"),
    ("num_cached_tokens", "cached prompt tok", "d"), ("window_s", "window s", ".1f"),
    ("batch_saturated", "batch saturated", "yn"),
)


def render_table(result: Mapping) -> str:
    """One row per metric, one column per mode, then the targets and the SLOs used."""
    modes = result["modes"]
    names = [m for m in MODES if m in modes]
    lines = [f"{'metric':<16}" + "".join(f"{m:>12}" for m in names)]
    for key, label, spec in _ROWS:
        lines.append(f"{label:<16}" + "".join(f"{_f((modes[m] or {}).get(key), spec):>12}" for m in names))
    cfg = result.get("config", {})
    lines.append(slo_line(cfg))
    if "targets" in result:
        lines += target_lines(result["targets"])
    early = [m for m in names if (modes[m] or {}).get("batch_saturated") is False]
    if early:
        lines.append(f"note: the batch ran out of lines inside the window in {', '.join(early)}: the pool was "
                     "not kept busy, so batch numbers understate capacity")
    lines += config_lines(cfg)
    return "\n".join(lines)


def slo_line(cfg: Mapping) -> str:
    """The SLOs used and how they were derived (``cfg["slo"]``, see ``hpcserve.bench.slo.derive``)."""
    line = (f"SLO: TTFT <= {_f(cfg.get('chat_ttft_slo_s'), '.3g')} s and per-request p99 ITL <= "
            f"{_f(cfg.get('chat_itl_slo_s'), '.3g')} s")
    how = (cfg.get("slo") or {}).get("derivation")
    return f"{line} ({how})" if how else line


def config_lines(cfg: Mapping) -> list[str]:
    """Where it ran: the machine and engine paths (``cfg["machine"]``) and each mode's daemon."""
    from hpcserve.bench.machine import describe

    lines = describe(cfg["machine"]) if cfg.get("machine") else []
    for mode, keys in (cfg.get("daemons") or {}).items():
        lines.append(f"daemon {mode}: " + ", ".join(f"{k} = {v}" for k, v in keys.items()))
    return lines


# -------------------------------------------------------------------------------------- config

def placement(mode: str, ranks: int) -> dict:
    """The ``[daemon]`` keys of a mode's daemon (all its other keys are the same in every mode):
    split dedicates ``ranks // 2`` replicas to chat; chat_only spreads chat over the replicas
    (``chat-pack-limit = 0``: packing exists to leave batch work uncapped on the other replicas, which
    chat alone does not need); the others keep the site's packing."""
    out = {"dedicated-chat-replicas": ranks // 2 if mode == "split" else 0}
    if mode == "chat_only":
        out["chat-pack-limit"] = 0
    return out


def daemon_config(user_doc: Mapping | None, ttft_slo_s: float, itl_slo_s: float,
                  dedicated_chat_replicas: int, chat_pack_limit: int | None = None,
                  num_threads: int | None = None) -> dict:
    """The user's site TOML (parsed) with the SLO keys and the placement keys set for one daemon
    (``chat_pack_limit`` None: the user's), and ``engine.num-threads`` set to ``num_threads`` unless
    the user's file sets it."""
    doc = {t: dict(v) for t, v in (user_doc or {}).items()}
    doc.setdefault("slo", {}).update({"chat-ttft-p99-s": float(ttft_slo_s), "chat-itl-p99-s": float(itl_slo_s)})
    doc.setdefault("daemon", {})["dedicated-chat-replicas"] = int(dedicated_chat_replicas)
    if chat_pack_limit is not None:
        doc["daemon"]["chat-pack-limit"] = int(chat_pack_limit)
    if num_threads is not None:
        doc.setdefault("engine", {}).setdefault("num-threads", int(num_threads))
    return doc


def rank_threads(site_num_threads: int | None, ranks: int, cpu_count: int | None) -> int | None:
    """``engine.num-threads`` for the benchmark's daemons: None when the site config sets it, else
    cores // ranks (at least 1), so the ranks do not oversubscribe the cores."""
    return None if site_num_threads else max(1, (cpu_count or 1) // ranks)


def _toml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    raise ValueError(f"cannot write {v!r} ({type(v).__name__}) to the generated site config")


def dump_toml(doc: Mapping[str, Mapping]) -> str:
    """A TOML document of tables of scalars (all the site config has)."""
    out = []
    for table, body in doc.items():
        out.append(f"[{table}]")
        out += [f"{k} = {_toml_scalar(v)}" for k, v in body.items()]
        out.append("")
    return "\n".join(out)

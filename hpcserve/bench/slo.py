"""Chat SLOs derived from the machine: the defaults of ``bench mixed`` and ``bench disagg``.

A fixed SLO (the site config's 1 s TTFT / 0.2 s ITL) is out of reach for a CPU with long prompts and
trivial for a fast machine, so unless both are given (``--chat-ttft-slo`` / ``--chat-itl-slo``), the
benchmark measures the unloaded latencies on a daemon of its own (the modes' config, started cold for
this only; ``loadgen.calibrate_slos``) and sets

    TTFT SLO = --slo-scale x unloaded TTFT        ITL SLO = --slo-scale x unloaded ITL p99

- unloaded TTFT: the median over ``TTFT_REPEATS`` requests sent one at a time (nothing else running),
  each with a fresh prompt of the workload's longest prompt length (clipped to the context) and one
  output token;
- unloaded ITL p99: p99 of the inter-token gaps of ``ITL_REPEATS`` decode-only requests sent one at a
  time (``ITL_PROMPT_LEN`` prompt tokens, ``ITL_OUTPUT_LEN`` output tokens), pooled.

All calibration prompts are "unmeasured" prompts (``mixed.unmeasured_ids``, distinct per request), so
they are never served from the prefix cache and never share blocks with the measured workload. An
explicit flag overrides its half only. ``SLO_SCALE`` (the default) is the smallest scale with which
``bench mixed``'s chat_only mode met both SLOs for at least 90% of its chat requests in every measured
run on a 2-core machine at a chat rate it can serve (bench/README.md has the measurements).

Interface::

    await measure_unloaded(chat, vocab_size, prompt_len, max_model_len) -> dict   (chat: Session.chat)
    derive(unloaded | None, scale, ttft_slo_s | None, itl_slo_s | None) -> dict   (the config's "slo")
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping

from hpcserve.bench import mixed
from hpcserve.errors import HpcserveError

SLO_SCALE = 20.0
TTFT_REPEATS = 3
ITL_REPEATS = 4
ITL_PROMPT_LEN = 16
ITL_OUTPUT_LEN = 64

Chat = Callable[[str, list[int], int, mixed.ChatRecord], Awaitable[None]]


async def measure_unloaded(chat: Chat, vocab_size: int, prompt_len: int, max_model_len: int | None) -> dict:
    """The unloaded TTFT (median, ``prompt_len`` tokens) and ITL p99 (pooled gaps); one request at a time."""
    ttft_len, _ = mixed.fit_lengths(prompt_len, 1, max_model_len)
    itl_len, itl_out = mixed.fit_lengths(ITL_PROMPT_LEN, ITL_OUTPUT_LEN, max_model_len)

    async def one(key: str, n: int, max_tokens: int) -> mixed.ChatRecord:
        rec = mixed.ChatRecord(arrival_s=time.monotonic())
        await chat(f"bench-slo-{key}", list(mixed.unmeasured_ids(f"slo-{key}", n, vocab_size)), max_tokens, rec)
        if rec.error is not None or not rec.chunks:
            raise HpcserveError(f"SLO calibration request {key} failed: {rec.error or 'no tokens'}")
        return rec

    ttfts = [(await one(f"ttft-{i}", ttft_len, 1)).ttft_s for i in range(TTFT_REPEATS)]
    gaps = [g for i in range(ITL_REPEATS) for g in (await one(f"itl-{i}", itl_len, itl_out)).itls]
    return {"ttft_s": statistics.median(ttfts), "ttft_samples_s": ttfts, "ttft_prompt_tokens": ttft_len,
            "itl_p99_s": mixed.percentile(gaps, 99), "itl_prompt_tokens": itl_len, "itl_output_tokens": itl_out,
            "itl_gaps": len(gaps)}


def derive(unloaded: Mapping | None, scale: float, ttft_slo_s: float | None, itl_slo_s: float | None) -> dict:
    """The SLOs of a run: each explicit value as given, else ``scale`` x its unloaded measurement."""
    if (ttft_slo_s is None or itl_slo_s is None) and not unloaded:
        raise ValueError("derive: no unloaded measurement to derive the missing SLO from")
    out = {"scale": scale, "unloaded": dict(unloaded) if unloaded else None}
    parts = []
    for key, src, flag, measured, label in (("chat_ttft_slo_s", "ttft_from", ttft_slo_s, "ttft_s", "TTFT"),
                                            ("chat_itl_slo_s", "itl_from", itl_slo_s, "itl_p99_s", "ITL")):
        if flag is not None:
            out[key], out[src] = flag, "flag"
            parts.append(f"{label} from its flag")
        else:
            out[key], out[src] = scale * unloaded[measured], "measured"
            parts.append(f"{label} = {scale:g} x unloaded {unloaded[measured]:.3g} s")
    if unloaded and "ttft_s" in unloaded:
        parts.append(f"unloaded: 1 request alone, TTFT median of {len(unloaded['ttft_samples_s'])} at "
                     f"{unloaded['ttft_prompt_tokens']} prompt tokens, ITL p99 of {unloaded['itl_gaps']} gaps")
    out["derivation"] = "; ".join(parts)
    return out

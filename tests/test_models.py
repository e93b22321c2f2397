"""Model resolution and loading: clear errors for bad directories, sharded checkpoints, GGUF conversion."""

from __future__ import annotations

import json
import shutil

import pytest

from hpcserve.errors import ModelError


def _greedy(path, prompts, n=12):
    from hpcserve import LLM, SamplingParams

    llm = LLM(str(path), max_num_seqs=8)
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_sharded_checkpoint_matches_single(tiny_model_factory):
    single = tiny_model_factory("qwen2", tie=False)
    sharded = tiny_model_factory("qwen2", tie=False, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    prompts = [[5, 6, 7, 8, 9], [100, 3, 42]]
    assert _greedy(single, prompts) == _greedy(sharded, prompts)


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("missing_dir", "model not found"),
        ("no_config", "no config.json"),
        ("bad_arch", "unsupported architecture"),
        ("bad_rope", "rope type 'yarn' is not supported"),
        ("no_weights", "no safetensors weights"),
        ("missing_tensor", "weights missing from the checkpoint: model.layers.1.mlp.down_proj.weight"),
        ("bad_shape", "has shape"),
        ("missing_shard", "shards listed in the index are missing"),
    ],
)
def test_bad_model_dirs_get_clear_errors(tiny_model_factory, tmp_path, breakage, needle):
    from safetensors.torch import load_file, save_file

    from hpcserve.engine.core import EngineConfig, LLMEngine

    src = tiny_model_factory("llama", shards=2 if breakage == "missing_shard" else 1)
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if breakage == "missing_dir":
        d = tmp_path / "nope"
    elif breakage == "no_config":
        cfg_path.unlink()
    elif breakage == "bad_arch":
        cfg["architectures"] = ["GPT2LMHeadModel"]
        cfg["model_type"] = "gpt2"
    elif breakage == "bad_rope":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        cfg.pop("rope_parameters", None)
    elif breakage == "no_weights":
        for f in d.glob("*.safetensors"):
            f.unlink()
    elif breakage in ("missing_tensor", "bad_shape"):
        w = load_file(str(d / "model.safetensors"))
        if breakage == "missing_tensor":
            del w["model.layers.1.mlp.down_proj.weight"]
        else:
            w["model.norm.weight"] = w["model.norm.weight"][:-1].clone()
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    elif breakage == "missing_shard":
        next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    if cfg_path.exists() and breakage not in ("no_config",):
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as exc:
        LLMEngine(EngineConfig(model=str(d)))
    assert needle in str(exc.value)


def test_cli_reports_bad_model_in_one_line(tmp_path):
    import subprocess
    import sys

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n')
    r = subprocess.run(
        [sys.executable, "-c", "from hpcserve.cli import main; main()", "run-batch", "--model",
         str(tmp_path / "missing"), str(inp), "-o", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "model not found" in r.stderr


@pytest.mark.parametrize("num_kv,decode_path", [(1, "all-pairs"), (4, "all-pairs"), (8, "per-group")])
def test_torch_decode_attention_paths_match_transformers(tiny_model_factory, num_kv, decode_path):
    """``TorchAttention`` has two fp32 decode paths, chosen by kv head count: all-pairs (every
    query head against every kv head, foreign pairs masked) up to ``ALL_PAIRS_MAX_KV_HEADS``,
    per-group matmuls above. Where the project's C kernels load, ``KernelsAttention`` and the
    fused forward take every fp32 decode, so the engine runs here with the torch backend and
    ``cpu_kernels=False``; the test checks that the torch path decoded, then compares every
    logits row (chunked prefills mixed with decodes) and the greedy tokens with transformers."""
    import torch
    from parity_harness import check_logits, hf_greedy, make_engine, make_prompt, run

    from hpcserve.kernels.cpu_gemm import PackedLinear
    from hpcserve.models.attention import ALL_PAIRS_MAX_KV_HEADS, TorchAttention

    path = tiny_model_factory("llama", num_attention_heads=8, num_key_value_heads=num_kv, head_dim=8)
    engine = make_engine(path, attention_backend="torch", cpu_kernels=False, collect_logits=True,
                         max_num_batched_tokens=24)
    model = engine.runner.model
    assert model.attn.name == "torch" and type(model.attn) is TorchAttention
    assert model.ops is None and not isinstance(model.layers[0].qkv, PackedLinear)
    assert model.cfg.num_kv_heads == num_kv
    assert ("all-pairs" if num_kv <= ALL_PAIRS_MAX_KV_HEADS else "per-group") == decode_path

    decodes = []  # (q dtype, kv heads) of every forward with decode rows: the branch TorchAttention takes
    torch_forward = model.attn.forward

    def observed(q, k, v, k_cache, v_cache, meta, scale):
        if meta.num_decode:
            decodes.append((q.dtype, k_cache.shape[2]))
        return torch_forward(q, k, v, k_cache, v_cache, meta, scale)

    model.attn.forward = observed
    schedule = {0: [("a", make_prompt(7, 11), 20), ("b", make_prompt(4, 12), 20)],
                3: [("c", make_prompt(30, 13), 12)]}  # joins late: 30 tokens in 2 chunks next to decodes
    prompts, outputs, logs, _ = run(engine, schedule)
    assert decodes and set(decodes) == {(torch.float32, num_kv)}
    check_logits(path, prompts, outputs, logs, f"torch-decode-kv{num_kv}")
    for r, p in prompts.items():
        assert outputs[r] == hf_greedy(path, p, len(outputs[r])), r

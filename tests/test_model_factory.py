"""The tiny offline model directories load with stock transformers."""

from __future__ import annotations

import json

import pytest

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_auto_classes(tiny_model_factory, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(family, tie=(family != "qwen2"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tok)
    assert (path / "model.safetensors").exists()
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token and tok.pad_token

    ids = tok("The cat sees a red ball today.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The cat sees a red ball today."
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16)
    new = out[0, ids.shape[1]:].tolist()
    assert len(set(new)) >= 4, f"degenerate continuation {new}"


def test_tie_flag(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie=True))
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie=False))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not untied.lm_head.weight.equal(untied.model.embed_tokens.weight)


def test_chat_template(tiny_model_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_factory("llama"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_sharded_has_index(tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all(f.endswith(".safetensors") for f in files)
    assert not (path / "model.safetensors").exists()
    sharded = AutoModelForCausalLM.from_pretrained(path)
    single = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    for (n, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
)
def test_rope_scaling_spellings(tiny_model_factory, rope):
    from model_factory import read_config

    cfg = read_config(tiny_model_factory("llama", **rope))
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert rp["rope_type"] == "linear" and rp["factor"] == 2.0
    assert rp.get("rope_theta", cfg.get("rope_theta")) == 10000.0


def test_bf16_and_seed(tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from model_factory import read_config

    path = tiny_model_factory("qwen3", dtype="bfloat16")
    cfg = read_config(path)
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    m = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    a = AutoModelForCausalLM.from_pretrained(tiny_model_factory("qwen3", seed=1))
    b = AutoModelForCausalLM.from_pretrained(tiny_model_factory("qwen3"))
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_conftest_does_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, %r); import conftest, model_factory; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    ) % str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code], check=True)

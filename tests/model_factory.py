"""Tiny, fully offline Hugging Face model directories for tests.

``make_tiny_model(out_dir, family="llama")`` writes a random-weight checkpoint
(safetensors) plus a byte-level BPE tokenizer with a ChatML chat template in about a
second. Nothing is downloaded.

Imports of torch/transformers/tokenizers happen inside the functions so that importing
this module (e.g. from conftest) stays cheap and torch-free.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

_VOCAB_SIZE = 512
# Weight-init knobs (see _scale_weights). Chosen by looking at greedy continuations:
# with transformers' default init (std 0.02) or unit gains, tied models repeat one
# token forever; these give varied 64-token continuations for every family.
OUT_GAIN = 8.0  # o_proj / down_proj: sublayers dominate the residual (tied models!)
QK_GAIN = 2.0  # q/k_proj (or qwen3 q/k_norm): sharper, position-dependent attention
HEAD_STD = 0.5  # untied lm_head: logits std ~4

# --------------------------------------------------------------------------- corpus

_SUBJECTS = [
    "the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird",
    "the engineer", "our neighbor", "the quick fox", "a young girl", "the farmer",
    "the computer", "this machine", "the river", "a scientist", "the cluster",
]
_VERBS = [
    "sees", "likes", "builds", "finds", "reads", "writes", "carries", "watches",
    "follows", "paints", "remembers", "answers", "opens", "moves", "runs", "loves",
]
_OBJECTS = [
    "a red ball", "the green house", "an old book", "the long letter", "a bright star",
    "the blue sky", "a warm cup of tea", "the wooden table", "a quiet garden",
    "the fast train", "a strange noise", "the large model", "a simple program",
    "the morning news", "a heavy box", "the open door",
]
_ENDINGS = [
    "today", "every morning", "in the park", "at night", "before dinner", "with care",
    "near the lake", "after the rain", "on monday", "again and again", "in the city",
    "without a word",
]
_EXTRA = [
    "Hello, how are you?", "I am fine, thank you.", "What is the weather like today?",
    "Please write a short story about a robot.", "The answer is 42.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024.",
    "def add(a, b):\n    return a + b\n", "Once upon a time, there was a king.",
    "User: hi\nAssistant: hello!", "Question? Answer! Yes; no: maybe...",
]


def _corpus(n: int = 400, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = list(_EXTRA)
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
        if rng.random() < 0.5:
            s = s[0].upper() + s[1:]
        out.append(s)
    return out


# --------------------------------------------------------------------------- tokenizer

_TOKENIZER_LOCK = threading.Lock()
_TOKENIZER_JSON: str | None = None  # the trained tokenizers.Tokenizer, serialized


def _trained_tokenizer_json() -> str:
    """Train (once per process) a byte-level BPE; cached as its JSON form."""
    global _TOKENIZER_JSON
    with _TOKENIZER_LOCK:
        if _TOKENIZER_JSON is None:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=_VOCAB_SIZE,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(_corpus(), trainer=trainer)
            _TOKENIZER_JSON = tok.to_str()
        return _TOKENIZER_JSON


def make_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` (ChatML template, bos/eos/pad set)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


# --------------------------------------------------------------------------- model


def _config_class(family: str):
    import transformers

    names = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
    }
    if family not in names:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return getattr(transformers, names[family])


def _scale_weights(model, seed: int) -> None:
    """Re-initialise with weights large enough to give varied, non-degenerate output.

    transformers' init (std 0.02) makes a tiny random model produce near-uniform logits
    and one repeated token. Here: embeddings N(0, 1); linear layers N(0, gain^2/fan_in)
    with gain OUT_GAIN for o/down_proj (otherwise a tied model's residual is dominated by
    the current token's embedding, which then wins the tied lm_head: endless repeats) and
    QK_GAIN for q/k; RMSNorm weights 1 + N(0, 0.1) (so a mis-applied norm weight shows
    up); biases N(0, 0.1); untied lm_head N(0, HEAD_STD^2). Logits come out with std
    ~4-8, so greedy top-1 decisions are robust against fp32 rounding differences.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn_like(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g, dtype=torch.float32) * std).to(t.dtype)

    lm_head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p is emb.weight:
                p.copy_(randn_like(p, 1.0))
            elif lm_head is not None and p is lm_head.weight:
                p.copy_(randn_like(p, HEAD_STD))
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # qwen3 normalises q/k per head: scale here instead of in q/k_proj.
                p.copy_(QK_GAIN * (1.0 + randn_like(p, 0.1)))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + randn_like(p, 0.1))
            elif name.endswith(".bias"):
                p.copy_(randn_like(p, 0.1))
            elif p.dim() == 2:
                fan_in = p.shape[1]
                gain = 1.0
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    gain = OUT_GAIN
                elif name.endswith(("q_proj.weight", "k_proj.weight")):
                    gain = QK_GAIN
                p.copy_(randn_like(p, gain / fan_in**0.5))
            else:  # pragma: no cover - nothing else in these families
                p.copy_(randn_like(p, 0.1))


def make_tiny_model(
    out_dir: Path,
    family: str = "llama",
    *,
    tie: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``family`` model + tokenizer to ``out_dir``; return it.

    ``config_overrides`` go into the config. RoPE scaling may be given either as
    ``rope_scaling=`` (transformers 4 spelling) or ``rope_parameters=`` (transformers 5);
    ``rope_theta`` is folded in so both spellings produce the same checkpoint.
    ``shards > 1`` writes a sharded safetensors checkpoint with an index.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = make_tokenizer()
    vocab_size = len(tok)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")

    cfg: dict[str, Any] = dict(DEFAULT_CONFIG)
    cfg.update(
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
    )
    if family == "mistral":
        cfg["sliding_window"] = None  # full attention, like Mistral v0.2+
    overrides = dict(config_overrides)
    rope = overrides.pop("rope_scaling", None)
    rope_p = overrides.pop("rope_parameters", None)
    if rope is not None and rope_p is not None:
        raise ValueError("give rope_scaling or rope_parameters, not both")
    rope = rope if rope is not None else rope_p
    cfg.update(overrides)
    if rope is not None:
        rope = dict(rope)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_theta", cfg["rope_theta"])
        cfg["rope_parameters"] = rope
    config = _config_class(family)(**cfg)
    config.dtype = dtype  # recorded in config.json (``dtype``/``torch_dtype``)

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_weights(model, seed)
    if tie:
        model.tie_weights()
    model = model.to(torch_dtype).eval()

    save_kwargs: dict[str, Any] = dict(safe_serialization=True)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = max(1, total // shards + 1)
    model.save_pretrained(out_dir, **save_kwargs)
    if model.generation_config is not None:
        # Keep generate() deterministic/greedy unless asked otherwise.
        model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())

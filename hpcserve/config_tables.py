"""Site-config tables: one frozen dataclass per TOML table, with per-key docs and validation.
No torch. ``hpcserve.config`` loads files into them and renders docs from their metadata.

Every field is declared with ``_opt(default, help, example)``; ``_Section.__post_init__``
checks each value's type (from the annotation) and then the table's own ``_problems()``,
raising :class:`ConfigError` with ``table.key``, the problem and the fix.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hpcserve.config_values import _STR_LIST, _kebab, _kind, _type_problem
from hpcserve.errors import HpcserveError

DTYPES = ("float32", "bfloat16")
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WINDOW_RE = re.compile(r"^([1-9][0-9]*)([smhd])$")


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


def window_seconds(value: object) -> int | None:
    """A batch completion window (``"24h"``: a positive integer and a unit s|m|h|d) in seconds;
    None when malformed. The one parser of windows (site config and batch API)."""
    m = _WINDOW_RE.match(value.strip()) if isinstance(value, str) else None
    return int(m.group(1)) * _WINDOW_UNITS[m.group(2)] if m else None


class _Section:
    """Shared validation: subclasses define ``TABLE`` and ``_problems()`` → [(field, message)]."""

    TABLE = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(getattr(self, f.name), list) and _kind(f)[0] == _STR_LIST:  # kept as tuples (hashable)
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
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
    http: str = _opt("", "HOST:PORT of the OpenAI-compatible HTTP API (/v1); empty = no HTTP.",
                     example="127.0.0.1:8000")
    max_prompt_bytes: int = _opt(4 << 20, "Largest prompt a chat or completion request may send, in bytes of "
                                          "text (all messages together); larger ones are refused before they are "
                                          "tokenized (400 / INVALID_ARGUMENT).")
    max_prompt_tokens: int = _opt(0, "Most prompt tokens per request; 0 = the model's context length.",
                                  example=32768)

    def _problems(self):
        out = []
        if _parse_listen(self.listen) is None:
            out.append(("listen", (f"expected host:port like 127.0.0.1:50051 or [::1]:50051 (port 0-65535), "
                                   f"got {self.listen!r}")))
        if self.http and _parse_listen(self.http) is None:
            out.append(("http", (f"expected host:port like 127.0.0.1:8000 or [::1]:8000 (port 0-65535), "
                                 f'got {self.http!r}; set http = "" to serve no HTTP API')))
        if not self.state_dir.strip():
            out.append(("state_dir", 'is empty; set state-dir to a writable directory, e.g. "~/.hpcserve"'))
        if self.mpiexec is not None and not self.mpiexec.strip():
            out.append(("mpiexec", "is empty; remove the key to use the venv's mpiexec, or give a path"))
        return (out + _at_least(self, "ranks", 1) + _at_least(self, "worker_restart_limit", 0)
                + _at_least(self, "worker_start_timeout_s", 0, strict=True) + _at_least(self, "drain_timeout_s", 0)
                + _at_least(self, "dedicated_chat_replicas", 0) + _at_least(self, "batch_watermark", 1)
                + _at_least(self, "chat_pack_limit", 0) + _at_least(self, "max_prompt_bytes", 1)
                + _at_least(self, "max_prompt_tokens", 0) + self._split_problems())

    def _split_problems(self):
        out = []
        if self.dedicated_chat_replicas and self.dedicated_chat_replicas >= self.ranks:
            out.append(("dedicated_chat_replicas", (f"must be below ranks ({self.ranks}) so that some replica "
                        f"serves batch, got {self.dedicated_chat_replicas}; use 0 to share every replica")))
        if not 0 <= self.chat_kv_reserve < 1:
            out.append(("chat_kv_reserve", f"must be in [0, 1), got {self.chat_kv_reserve!r}"))
        return out

    @property
    def host_port(self) -> tuple[str, int]:
        return _parse_listen(self.listen)  # type: ignore[return-value]  # validated

    @property
    def http_host_port(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP API, None when ``http`` is empty."""
        return _parse_listen(self.http) if self.http else None

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
                                               'units s m h d); the window of a batch that names none.')
    batch_completion_windows: tuple[str, ...] = _opt(("24h",), "The completion windows a batch may ask for (OpenAI's "
                                                     "completion_window); others are refused with this list. Batches "
                                                     "are fed earliest deadline first, so a short window is a "
                                                     "priority: list only the ones the site grants.",
                                                     example=["1h", "24h"])

    def _problems(self):
        out = (_at_least(self, "chat_ttft_p99_s", 0, strict=True) + _at_least(self, "chat_itl_p99_s", 0, strict=True)
               + _at_least(self, "batch_step_slowdown", 0))
        if window_seconds(self.batch_completion_window) is None:
            out.append(("batch_completion_window", ('expected a positive integer and a unit s|m|h|d like "24h", '
                                                    f"got {self.batch_completion_window!r}")))
        windows = list(self.batch_completion_windows)
        if not windows or any(window_seconds(w) is None for w in windows):
            out.append(("batch_completion_windows", ('expected a non-empty list of windows like ["24h"] (a '
                                                     f"positive integer and a unit s|m|h|d), got {windows!r}")))
        elif self.batch_completion_window not in windows:
            out.append(("batch_completion_window", (f"{self.batch_completion_window!r} is not one of "
                                                    f"slo.batch-completion-windows {windows!r}; add it there or "
                                                    "pick one of them")))
        return out

    @property
    def batch_completion_window_s(self) -> float:
        return window_seconds(self.batch_completion_window)  # type: ignore[return-value]  # validated


ROLES = ("mixed", "prefill", "decode")


def parse_roles(spec: str) -> list[str] | None:
    """``"prefill:1,decode:2"`` → ``["prefill", "decode", "decode"]`` (rank order); ``""`` → ``[]``;
    None if malformed."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, count = part.partition(":")
        name = name.strip().lower()
        if name not in ROLES or (sep and not count.strip().isdigit()):
            return None
        out += [name] * (int(count) if sep else 1)
    return out


@dataclass(frozen=True)
class DisaggSection(_Section):
    TABLE = "disagg"
    roles: str = _opt("", 'Replica roles in rank order, as "prefill:N,decode:M" (a "mixed:K" part may follow); '
                          "the counts must add up to daemon.ranks. Empty: every replica is mixed (prefill and "
                          "decode on the same rank). Prefill replicas compute prompts and hand the KV cache "
                          "to a decode replica over MPI.", example="prefill:1,decode:3")
    transfer_timeout_s: float = _opt(30.0, "Seconds a KV handoff may take before it fails; the decode replica "
                                           "then computes the prompt itself.")
    kv_checksum: bool = _opt(False, "Debug: the sender digests every layer group (blake2b) and the receiver "
                                    "verifies them (counted in hpcserve status). Costs a pass over the bytes.")
    group_mib: float = _opt(2.0, "Target size of one KV handoff message (a group of consecutive layers), MiB; "
                                 "smaller groups overlap packing and sending more, larger ones cost fewer messages.")

    def _problems(self):
        out = _at_least(self, "transfer_timeout_s", 0, strict=True) + _at_least(self, "group_mib", 0, strict=True)
        roles = parse_roles(self.roles)
        if roles is None:
            out.append(("roles", (f'expected "prefill:N,decode:M" (roles {", ".join(ROLES)} with counts), '
                                  f"got {self.roles!r}")))
        elif ("prefill" in roles) != ("decode" in roles):
            out.append(("roles", (f"{self.roles!r} needs both prefill and decode replicas (a prefill replica "
                                  'hands its KV to a decode replica), e.g. "prefill:1,decode:1"')))
        return out

    @property
    def role_list(self) -> list[str]:
        return parse_roles(self.roles) or []

    @property
    def is_disaggregated(self) -> bool:
        return "prefill" in self.role_list


CONTINUATIONS = ("singleton", "requeue", "none")
_SLURM_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass(frozen=True)
class SlurmSection(_Section):
    TABLE = "slurm"
    partition: str | None = _opt(None, "Partition to submit to (sbatch --partition).", example="gpu")
    account: str | None = _opt(None, "Account to charge (sbatch --account).", example="proj123")
    qos: str | None = _opt(None, "Quality of service (sbatch --qos).", example="normal")
    nodes: int = _opt(1, "Nodes of the allocation; daemon.ranks tasks are spread over them.")
    gpus_per_node: int = _opt(0, "GPUs per node (sbatch --gpus-per-node; one per rank on GPU clusters).")
    cpus_per_task: int | None = _opt(None, "CPUs per rank (sbatch --cpus-per-task).", example=8)
    mem: str | None = _opt(None, 'Memory per node (sbatch --mem, e.g. "0" for all of it).', example="200G")
    time: str = _opt("12:00:00", 'Walltime of one allocation ("HH:MM:SS", "D-HH:MM:SS" or minutes).')
    drain_s: int = _opt(600, "Seconds before the walltime at which Slurm signals USR1 (sbatch --signal) and the "
                             "daemon drains: batch lines that cannot finish stop, state is flushed, exit 0.")
    continuation: str = _opt("singleton", 'How the service continues after an allocation ends: "singleton" '
                                          "(the script submits its successor with --dependency=singleton), "
                                          '"requeue" (scontrol requeue of the same job) or "none".')
    job_name: str = _opt("hpcserve", "Job name; with continuation = singleton it also chains the allocations.")
    mpi: str = _opt("pmi2", 'srun --mpi plugin for the worker step: "pmi2" for the mpich wheel, "pmix" for '
                            "Open MPI (with mpi4py-mpiabi = \"openmpi\"), or the site's choice.")
    mpi4py_mpiabi: str | None = _opt(None, 'MPI4PY_MPIABI for the workers: which MPI library mpi4py loads '
                                           '("openmpi", "mpich"; unset: the first one found).', example="openmpi")
    srun_args: str = _opt("", 'Extra srun arguments for the worker step, e.g. "--cpu-bind=cores".')
    env: str = _opt("", 'Environment for the worker step, as space-separated NAME=VALUE pairs, e.g. '
                        '"UCX_TLS=rc,sm,self UCX_NET_DEVICES=mlx5_0:1".')
    setup: str = _opt("", 'Shell lines run before hpcserve in the job script (module loads), separated by ";".',
                      example="module load openmpi/4.1 ucx")

    def _problems(self):
        out = _at_least(self, "nodes", 1) + _at_least(self, "gpus_per_node", 0) + _at_least(
            self, "cpus_per_task", 1) + _at_least(self, "drain_s", 0)
        if not _SLURM_TIME_RE.match(self.time.strip()):
            out.append(("time", f'expected a Slurm time like "12:00:00", "1-00:00:00" or "90", got {self.time!r}'))
        if self.continuation not in CONTINUATIONS:
            out.append(("continuation", f"must be one of {', '.join(CONTINUATIONS)}, got {self.continuation!r}"))
        if not self.mpi.strip() or " " in self.mpi.strip():
            out.append(("mpi", f'expected one srun --mpi plugin name like "pmi2" or "pmix", got {self.mpi!r}'))
        bad = [kv for kv in self.env.split() if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv)]
        if bad:
            out.append(("env", f"expected NAME=VALUE pairs separated by spaces, got {' '.join(bad)!r}"))
        return out

    @property
    def env_vars(self) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in self.env.split())

    def time_s(self) -> int:
        """The walltime in seconds (Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
        t = self.time.strip()
        days, _, rest = t.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        if days:
            h, m, sec = (parts + [0, 0])[:3]
            return int(days) * 86400 + h * 3600 + m * 60 + sec
        if len(parts) == 1:
            return parts[0] * 60
        if len(parts) == 2:
            return parts[0] * 60 + parts[1]
        return parts[0] * 3600 + parts[1] * 60 + parts[2]


@dataclass(frozen=True)
class AuthSection(_Section):
    TABLE = "auth"
    keys_file: str = _opt("", "Path of the hashed API-keys file managed by `hpcserve keys` (~ and $VARS expand); "
                              "empty = <daemon.state-dir>/keys.json.", example="/etc/hpcserve/keys.json")
    endpoint_tenant: str = _opt("default", "Tenant whose key the daemon mints at each start and writes into "
                                           "endpoint.json, so local clients and the demo need no set-up; \"\" = "
                                           "write no key: every client then needs its own (`hpcserve keys add`).")


@dataclass(frozen=True)
class TlsSection(_Section):
    TABLE = "tls"
    cert_file: str | None = _opt(None, "PEM certificate chain; with key-file set, gRPC and HTTP both serve TLS.",
                                 example="/etc/hpcserve/tls/fullchain.pem")
    key_file: str | None = _opt(None, "PEM private key of cert-file (keep it mode 0600).",
                                example="/etc/hpcserve/tls/privkey.pem")

    def _problems(self):
        out = []
        for name in ("cert_file", "key_file"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                out.append((name, "is empty; remove the key to serve without TLS, or give a PEM file path"))
        if (self.cert_file is None) != (self.key_file is None):
            have, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            out.append((missing, (f"is not set but tls.{_kebab(have)} is; set both (a PEM certificate chain and "
                                  "its private key) to serve TLS, or neither")))
        return out

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


PRIORITIES = ("interactive", "batch")  # highest first
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class TenantSection(_Section):
    """One ``[tenants.NAME]`` table. ``TABLE`` is a placeholder: ``hpcserve.config`` puts the tenant's
    name into error messages (``tenants.alice.requests-per-minute: ...``)."""

    TABLE = "tenants.NAME"
    models: tuple[str, ...] = _opt(("*",), 'Model names this tenant may use ("*" = all).',
                                   example=["demo"])
    max_priority: str = _opt("interactive", 'Highest class of its chat streams: "interactive" | "batch" (a tenant '
                                            'capped at "batch" has its chats run in the batch class, never '
                                            "refused).")
    requests_per_minute: int = _opt(0, "Requests per minute (sliding 60-s window); 0 = unlimited.")
    tokens_per_minute: int = _opt(0, "Tokens per minute (prompt + max_tokens of each request, sliding 60-s "
                                     "window); 0 = unlimited.")
    daily_token_quota: int = _opt(0, "Tokens in+out per UTC day, chat and batch together; 0 = unlimited.")
    max_concurrent_streams: int = _opt(0, "Chat streams (requests) in flight at once; 0 = unlimited.")
    admin: bool = _opt(False, "Admin tenants may drain the daemon, see server-wide stats and every tenant's usage.")
    input_dirs: tuple[str, ...] = _opt((), "Directories under which this tenant may name batch input files by path "
                                           "(SubmitBatch input_path, resolved with symlinks followed); empty = by "
                                           "path only for admin tenants, others send the content.",
                                       example=["/lustre/projects/alice"])
    isolate_prefix_cache: bool = _opt(False, "Salt this tenant's KV prefix-cache blocks so no other tenant can hit "
                                             "them (closes the cache-timing side channel; costs sharing).")
    storage_quota_gb: float = _opt(0.0, "Most GiB of uploaded files (and inline batch inputs) this tenant may keep "
                                        "in the state dir; 0 = unlimited.")

    def _problems(self):
        out = []
        if not self.models:
            out.append(("models", 'is empty, so the tenant could use no model; list model names or "*" for all'))
        elif any(not m.strip() for m in self.models):
            out.append(("models", f'contains an empty name ({list(self.models)!r}); list model names or "*"'))
        if self.max_priority not in PRIORITIES:
            out.append(("max_priority", f"must be one of {', '.join(PRIORITIES)}, got {self.max_priority!r}"))
        if any(not os.path.isabs(os.path.expanduser(os.path.expandvars(d))) for d in self.input_dirs):
            out.append(("input_dirs", f"must be absolute directories, got {list(self.input_dirs)!r}"))
        return (out + _at_least(self, "requests_per_minute", 0) + _at_least(self, "tokens_per_minute", 0)
                + _at_least(self, "daily_token_quota", 0) + _at_least(self, "max_concurrent_streams", 0)
                + _at_least(self, "storage_quota_gb", 0))

    @property
    def input_paths(self) -> tuple[Path, ...]:
        """``input_dirs`` with ~ and $VARS expanded."""
        return tuple(Path(os.path.expanduser(os.path.expandvars(d))) for d in self.input_dirs)

    @property
    def storage_quota_bytes(self) -> int:
        """``storage_quota_gb`` in bytes; 0 = unlimited."""
        return int(self.storage_quota_gb * (1 << 30))

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models

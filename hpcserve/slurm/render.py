"""Fill in the sbatch templates (``hpcserve/slurm/templates/*.sbatch``) from a site config. No torch.

Interface::

    render(template_name, cfg, *, config_path, hpcserve, extra=None) -> str
    TEMPLATES            name -> TemplateInfo (summary, the config keys it reads, its extra keys)
    template_names()     the shipped templates, e.g. ["batch.sbatch", "hetjob.sbatch", "serve.sbatch"]

``render`` is a pure function of its arguments: ``cfg`` is a loaded :class:`~hpcserve.config.SiteConfig`;
``config_path`` (the site TOML the job's daemon reads) and ``hpcserve`` (the command the job runs,
e.g. the venv's ``bin/hpcserve``) go into the script as given, so pass absolute paths; ``extra``
fills the template's own keys (``batch.sbatch``: input, output, errors, ready_timeout;
``hetjob.sbatch``: roles), spelled with ``_`` or ``-``. The one outside input is the expansion of
``~``/``$VARS`` in ``daemon.state-dir`` (with the current environment): ``#SBATCH --output`` is not
read by a shell, so the log path must be literal.

Template syntax: ``{{name}}``. A line that holds only a placeholder whose value is empty is dropped
(so unset optional keys leave no ``#SBATCH`` line, and a continuation's code appears only for that
continuation); a multi-line value takes that line's indentation. Values the script uses as shell
words are quoted with :func:`shlex.quote`. Problems raise :class:`~hpcserve.config_tables.ConfigError`
with one line that names the valid choices: an unknown template, an unknown placeholder in a
template, an unknown or missing ``extra`` key, or config values no script can use (a state dir with
spaces, more nodes than ranks, a drain window as long as the walltime, ...).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from hpcserve.config_tables import ConfigError, parse_roles

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_JOB_NAME = re.compile(r"[A-Za-z0-9._+-]+")
MAX_SIGNAL_S = 65535  # sbatch --signal=...@SECONDS upper bound


@dataclass(frozen=True)
class ExtraKey:
    """A value a template needs beyond the site config (``--set NAME=VALUE`` on the CLI)."""

    name: str
    help: str
    required: bool = False
    path: bool = False  # a file path: the CLI makes it absolute (the job may start elsewhere)


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    summary: str
    config_keys: tuple[str, ...]
    extra: tuple[ExtraKey, ...] = ()


_COMMON_KEYS = ("daemon.state-dir", "daemon.ranks", "slurm.partition", "slurm.account", "slurm.qos", "slurm.nodes",
                "slurm.gpus-per-node", "slurm.cpus-per-task", "slurm.mem", "slurm.time", "slurm.drain-s",
                "slurm.job-name", "slurm.mpi4py-mpiabi", "slurm.env", "slurm.setup")

TEMPLATES: dict[str, TemplateInfo] = {t.name: t for t in (
    TemplateInfo(
        "serve.sbatch",
        "the long-lived service: the daemon and its worker step on one allocation, drained by USR1 "
        "before the time limit and continued on the next allocation (slurm.continuation)",
        _COMMON_KEYS + ("slurm.continuation",)),
    TemplateInfo(
        "batch.sbatch",
        "one OpenAI Batch JSONL file run to completion: start a daemon, wait until it is ready, "
        "submit --wait, write the results, stop the daemon (job name: slurm.job-name + \"-batch\")",
        _COMMON_KEYS + ("daemon.worker-start-timeout-s",),
        (ExtraKey("input", "the batch JSONL file to run", required=True, path=True),
         ExtraKey("output", "where the output lines go", required=True, path=True),
         ExtraKey("errors", "where the error lines go (default: OUTPUT with .jsonl -> .errors.jsonl)", path=True),
         ExtraKey("ready_timeout", "seconds the daemon gets to become ready (default: "
                                   "daemon.worker-start-timeout-s + 60)"))),
    TemplateInfo(
        "hetjob.sbatch",
        "the service as a heterogeneous job: component 0 runs the prefill ranks, component 1 the "
        "decode ranks (disagg.roles), one worker step across both",
        _COMMON_KEYS + ("slurm.continuation", "slurm.mpi", "disagg.roles"),
        (ExtraKey("roles", 'the roles, "prefill:N,decode:M" (default: disagg.roles)'),)),
)}

# Placeholders filled from the config: a --set of one of these names is pointed to its config key.
_FROM_CONFIG = {"job_name": "slurm.job-name", "state_dir": "daemon.state-dir", "log_dir": "daemon.state-dir",
                "drain_s": "slurm.drain-s", "continuation": "slurm.continuation", "mpi": "slurm.mpi",
                "ranks": "daemon.ranks", "time": "slurm.time", "nodes": "slurm.nodes"}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def template_info(name: str) -> TemplateInfo:
    info = TEMPLATES.get(name) or TEMPLATES.get(f"{name}.sbatch")
    if info is None:
        raise ConfigError(f"unknown template {name!r}; valid templates: {', '.join(template_names())}")
    return info


def template_text(name: str) -> str:
    """The raw template (with its ``{{placeholders}}``)."""
    info = template_info(name)
    return resources.files("hpcserve.slurm").joinpath("templates", info.name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- values

def _q(value: str) -> str:
    return shlex.quote(str(value))


def _state_dir(cfg: SiteConfig) -> str:
    raw = cfg.daemon.state_dir
    path = os.path.expanduser(os.path.expandvars(raw.strip()))
    if "$" in path or path.startswith("~"):
        raise ConfigError(f"daemon.state-dir: {raw!r} does not expand here (unset variable or unknown user); "
                          "set the variable or give the path itself", key="daemon.state-dir")
    if not os.path.isabs(path):
        raise ConfigError(f"daemon.state-dir: {raw!r} is relative; an sbatch script needs an absolute path "
                          "(or one under ~) for its logs", key="daemon.state-dir")
    if re.search(r"\s", path):
        raise ConfigError(f"daemon.state-dir: {path!r} contains whitespace, which #SBATCH --output cannot "
                          "hold; choose a path without spaces", key="daemon.state-dir")
    return os.path.normpath(path)


def _check_word(key: str, value: str | None) -> None:
    if value is not None and (not value.strip() or re.search(r"\s", value)):
        raise ConfigError(f"{key}: {value!r} is not a single word as #SBATCH needs it; remove the spaces "
                          "(or the key)", key=key)


def _check(cfg: SiteConfig) -> None:
    s, ranks = cfg.slurm, cfg.daemon.ranks
    if not _JOB_NAME.fullmatch(s.job_name):
        raise ConfigError(f"slurm.job-name: {s.job_name!r} must be letters, digits and . _ + - only "
                          "(it appears in #SBATCH lines and shell commands)", key="slurm.job-name")
    for key in ("partition", "account", "qos", "mem"):
        _check_word(f"slurm.{key}", getattr(s, key))
    if s.nodes > ranks:
        raise ConfigError(f"slurm.nodes: {s.nodes} nodes for {ranks} rank(s) (daemon.ranks) leaves a node "
                          "without a task; lower nodes or raise ranks", key="slurm.nodes")
    if s.drain_s > MAX_SIGNAL_S:
        raise ConfigError(f"slurm.drain-s: {s.drain_s} exceeds sbatch --signal's limit of {MAX_SIGNAL_S} s",
                          key="slurm.drain-s")
    if s.drain_s and s.drain_s >= s.time_s():
        raise ConfigError(f"slurm.drain-s: {s.drain_s} s is not shorter than slurm.time ({s.time} = "
                          f"{s.time_s()} s), so every allocation would drain at once; lower drain-s or raise "
                          "time", key="slurm.drain-s")


def _opt_lines(opts: list[tuple[str, object]]) -> list[str]:
    """``[("ntasks", 2), ("requeue", True), ("qos", None)]`` → ``#SBATCH --ntasks=2``, ``#SBATCH --requeue``."""
    out = []
    for key, value in opts:
        if value is None or value is False:
            continue
        out.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    return out


def _site_opts(cfg: SiteConfig) -> list[tuple[str, object]]:
    s = cfg.slurm
    return [("partition", s.partition), ("account", s.account), ("qos", s.qos)]


def _per_task_opts(cfg: SiteConfig) -> list[tuple[str, object]]:
    return [("cpus-per-task", cfg.slurm.cpus_per_task), ("mem", cfg.slurm.mem)]


def _job_opts(cfg: SiteConfig, log: str, continuation: str | None) -> list[tuple[str, object]]:
    s = cfg.slurm
    requeue = continuation == "requeue"
    return [("time", s.time), ("signal", f"B:USR1@{s.drain_s}" if s.drain_s else None),
            ("output", log), ("error", log), ("requeue", requeue), ("open-mode", "append" if requeue else None)]


def _homogeneous_opts(cfg: SiteConfig, job_name: str, log: str, continuation: str | None) -> list[str]:
    s, ranks = cfg.slurm, cfg.daemon.ranks
    per_node = ranks // s.nodes if s.nodes > 1 and ranks % s.nodes == 0 else None
    return _opt_lines([("job-name", job_name), ("ntasks", ranks), ("nodes", s.nodes), ("ntasks-per-node", per_node),
                       *_site_opts(cfg), ("gpus-per-node", s.gpus_per_node or None), *_per_task_opts(cfg),
                       *_job_opts(cfg, log, continuation)])


def _het_opts(cfg: SiteConfig, job_name: str, log: str, counts: tuple[int, int]) -> list[str]:
    """Component 0 (prefill) and 1 (decode): tasks, enough nodes for them, one GPU per task when the
    site has GPUs. Job-wide options (name, signal, logs, requeue) go on component 0; site options and
    the time limit are repeated on each component."""
    s = cfg.slurm
    per_node = s.gpus_per_node or math.ceil(cfg.daemon.ranks / s.nodes)
    lines: list[str] = []
    for i, count in enumerate(counts):
        comp = [("ntasks", count), ("nodes", math.ceil(count / per_node)), *_site_opts(cfg),
                ("gpus-per-task", 1 if s.gpus_per_node else None), *_per_task_opts(cfg)]
        if i == 0:
            lines += _opt_lines([("job-name", job_name), *comp, *_job_opts(cfg, log, s.continuation)])
        else:
            lines += ["#SBATCH hetjob", *_opt_lines([*comp, ("time", s.time)])]
    return lines


def _block(comment: str, lines: list[str]) -> str:
    """A commented block of script lines followed by a blank line; "" (no line at all) when empty."""
    return "\n".join([comment, *lines, ""]) if lines else ""


def _env_blocks(cfg: SiteConfig) -> dict[str, str]:
    s = cfg.slurm
    setup = [line.strip() for line in s.setup.split(";") if line.strip()]
    env = dict(s.env_vars)
    if s.mpi4py_mpiabi:
        env["MPI4PY_MPIABI"] = s.mpi4py_mpiabi
    return {
        "setup": _block("# Site setup (slurm.setup).", setup),
        "exports": _block("# Site environment (slurm.env, slurm.mpi4py-mpiabi); srun passes it on to the worker step.",
                          [f"export {k}={_q(v)}" for k, v in env.items()]),
    }


def _drain_hint(cfg: SiteConfig) -> str:
    d = cfg.slurm.drain_s
    if not d:
        return ("# No drain window (slurm.drain-s = 0): the daemon stops when the time limit sends TERM, with "
                "KillWait\n# seconds to checkpoint before SIGKILL.")
    return (f"# Drain: Slurm sends USR1 to this shell {d} s before the time limit (--signal=B:USR1@{d}); the daemon\n"
            "# then checkpoints its batch lines, gives chats drain-timeout-s, flushes the state dir and exits 0.")


def _continuation_blocks(cfg: SiteConfig) -> dict[str, str]:
    s = cfg.slurm
    name = s.job_name
    if s.continuation == "singleton":
        return {
            "stop_hint": f"# Stop:    scancel --name={name}    (this allocation and its queued successor)",
            "successor": f"""\
# Continuation (singleton): queue the successor before the daemon starts, so that the next
# allocation waits in the queue (gaining priority) while this one runs; --dependency=singleton
# holds it until this job, the only other one named {name}, has ended. It is this same script
# ($0 is Slurm's copy of it), submitted from this job's working directory.
successor=$(sbatch --parsable --dependency=singleton --job-name={name} "$0")
successor=${{successor%%;*}}
if [ -n "$successor" ]; then
    echo "hpcserve: queued successor job $successor (--dependency=singleton)" >&2
else
    echo "hpcserve: could not queue a successor job: the service ends with this allocation" >&2
fi
""",
            "after_exit": """\
# The daemon failed on its own (no drain, no stop signal): cancel the successor, which would most
# likely fail the same way on every allocation.
if [ "$rc" -ne 0 ] && [ -z "$stop" ] && [ -n "$successor" ]; then
    echo "hpcserve: cancelling successor job $successor; fix the failure above, then sbatch this script again" >&2
    scancel "$successor"
fi""",
        }
    if s.continuation == "requeue":
        return {
            "stop_hint": "# Stop:    scancel JOB_ID    (a cancelled job is not requeued)",
            "successor": "",
            "after_exit": """\
# Continuation (requeue): after a drain (exit 0 and not cancelled), put this same job back in the
# queue; its log is appended to across the runs (--open-mode=append).
if [ "$rc" -eq 0 ] && [ "$stop" != term ]; then
    echo "hpcserve: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi""",
        }
    return {"stop_hint": "# Stop:    scancel JOB_ID    (the daemon drains, then exits)", "successor": "",
            "after_exit": ""}


def _extra_values(info: TemplateInfo, cfg: SiteConfig, extra: Mapping[str, str]) -> dict[str, str]:
    valid = {k.name: k for k in info.extra}
    given: dict[str, str] = {}
    for key, value in extra.items():
        name = key.strip().replace("-", "_")
        if name not in valid:
            if "." in key:
                hint = f"{key!r} is a site config key; set it in the TOML file, not with --set"
            elif name in _FROM_CONFIG:
                hint = (f"{key!r} comes from the site config ({_FROM_CONFIG[name]}); set it in the TOML file, "
                        "not with --set")
            else:
                hint = f"unknown key {key!r}"
            choices = ", ".join(valid) if valid else "none (it reads only the site config)"
            raise ConfigError(f"{info.name}: {hint}; valid --set keys for {info.name}: {choices}", key=key)
        if not str(value).strip():
            raise ConfigError(f"{info.name}: --set {name} is empty; give a value", key=name)
        given[name] = str(value).strip()
    missing = [k.name for k in info.extra if k.required and k.name not in given]
    if missing:
        example = " ".join(f"--set {m}={m.upper()}" for m in missing)
        raise ConfigError(f"{info.name} needs {', '.join(missing)}: add {example}", key=missing[0])

    out: dict[str, str] = {}
    if info.name == "batch.sbatch":
        output = given["output"]
        errors = given.get("errors") or output.removesuffix(".jsonl") + ".errors.jsonl"
        if errors == output:
            raise ConfigError("batch.sbatch: errors and output are the same file; give --set errors=OTHER.jsonl",
                              key="errors")
        timeout = given.get("ready_timeout", str(int(cfg.daemon.worker_start_timeout_s) + 60))
        if not timeout.isdigit() or int(timeout) < 1:
            raise ConfigError(f"batch.sbatch: ready_timeout must be a whole number of seconds >= 1, got {timeout!r}",
                              key="ready_timeout")
        out.update(input=_q(given["input"]), output=_q(output), errors=_q(errors), ready_timeout=timeout)
    elif info.name == "hetjob.sbatch":
        spec = given.get("roles", cfg.disagg.roles)
        roles = parse_roles(spec)
        n_pre = (roles or []).count("prefill")
        n_dec = (roles or []).count("decode")
        if not roles or not n_pre or not n_dec or roles != ["prefill"] * n_pre + ["decode"] * n_dec:
            src = "--set roles" if "roles" in given else "disagg.roles"
            raise ConfigError(f'hetjob.sbatch needs prefill and decode roles only, prefill first ("prefill:N,'
                              f'decode:M"), got {src} = {spec!r}; set [disagg] roles or --set roles=prefill:1,'
                              "decode:1", key="roles")
        out.update(roles=f"prefill:{n_pre},decode:{n_dec}", prefill_ranks=str(n_pre), decode_ranks=str(n_dec),
                   last_prefill_rank=str(n_pre - 1), last_rank=str(n_pre + n_dec - 1))
    return out


def _values(info: TemplateInfo, cfg: SiteConfig, config_path: str, hpcserve: str,
            extra: Mapping[str, str]) -> dict[str, str]:
    _check(cfg)
    s = cfg.slurm
    state = _state_dir(cfg)
    log = os.path.join(state.replace("%", "%%"), "logs", "slurm-%j.out")  # Slurm expands %j; %% is a literal %
    values = {
        "config_path": _q(config_path), "hpcserve": _q(hpcserve), "state_dir": _q(state),
        "log_dir": _q(os.path.join(state, "logs")), "drain_s": str(s.drain_s), "drain_hint": _drain_hint(cfg),
        **_env_blocks(cfg), **_extra_values(info, cfg, extra),
    }
    if info.name == "batch.sbatch":
        values["sbatch_options"] = "\n".join(_homogeneous_opts(cfg, f"{s.job_name}-batch", log, None))
        return values
    values.update(continuation=s.continuation, **_continuation_blocks(cfg))
    if info.name == "hetjob.sbatch":
        counts = (int(values["prefill_ranks"]), int(values["decode_ranks"]))
        values.update(mpi=s.mpi, sbatch_options="\n".join(_het_opts(cfg, s.job_name, log, counts)))
    else:
        values["sbatch_options"] = "\n".join(_homogeneous_opts(cfg, s.job_name, log, s.continuation))
    return values


# ---------------------------------------------------------------------------------------- rendering

def _fill(name: str, text: str, values: Mapping[str, str]) -> str:
    valid = ", ".join(sorted(values))
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _PLACEHOLDER.finditer(line):
            key = m.group(1)
            if not _NAME.fullmatch(key) or key not in values:
                raise ConfigError(f"template {name}, line {lineno}: unknown placeholder {m.group(0)}; "
                                  f"valid placeholders: {valid}")
    out: list[str] = []
    for line in text.splitlines():
        alone = _PLACEHOLDER.fullmatch(line.strip())
        if alone:
            value = values[alone.group(1)]
            indent = line[:len(line) - len(line.lstrip())]
            if value:  # an empty value leaves no line at all
                out += [indent + v if v else v for v in value.split("\n")]
            continue
        out.append(_PLACEHOLDER.sub(lambda m: _inline(name, m.group(1), values), line))
    return "\n".join(out) + "\n"


def _inline(name: str, key: str, values: Mapping[str, str]) -> str:
    value = values[key]
    if "\n" in value:
        raise ConfigError(f"template {name}: {{{{{key}}}}} is a block of lines; put it alone on its line")
    return value


def placeholders(template_name: str) -> list[str]:
    """The placeholders a template uses (from its text)."""
    return sorted({m.group(1) for m in _PLACEHOLDER.finditer(template_text(template_name))})


def render(template_name: str, cfg: SiteConfig, *, config_path: str, hpcserve: str,
           extra: Mapping[str, str] | None = None) -> str:
    """The filled-in sbatch script (see the module docstring); ConfigError on any problem."""
    info = template_info(template_name)
    values = _values(info, cfg, config_path, hpcserve, extra or {})
    return _fill(info.name, template_text(info.name), values)

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

from hpcserve.config_tables import (
    TENANT_NAME_RE,
    AuthSection,
    ConfigError,
    DaemonSection,
    DisaggSection,
    EngineSection,
    ModelSection,
    SloSection,
    SlurmSection,
    TenantSection,
    TlsSection,
    _kebab,
    _Section,
)
from hpcserve.config_values import _STR_LIST, _kind, _toml_type, _toml_value

__all__ = [
    "ENV_VARS",
    "AuthSection",
    "ConfigError",
    "DaemonSection",
    "DisaggSection",
    "EngineSection",
    "ModelSection",
    "SiteConfig",
    "SloSection",
    "SlurmSection",
    "TenantSection",
    "TlsSection",
    "config_keys",
    "load_config",
    "render_defaults",
    "render_docs_table",
]

ENV_VARS = {  # env var -> "table.key"
    "HPCSERVE_STATE_DIR": "daemon.state-dir",
    "HPCSERVE_LISTEN": "daemon.listen",
    "HPCSERVE_MODEL": "model.path",
    "HPCSERVE_HTTP": "daemon.http",
}


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection, "engine": EngineSection, "daemon": DaemonSection, "slo": SloSection,
    "disagg": DisaggSection, "slurm": SlurmSection, "auth": AuthSection, "tls": TlsSection,
}
TENANTS = "tenants"  # [tenants.NAME] tables: a table of TenantSection tables, not in _SECTIONS


def default_tenants() -> dict[str, TenantSection]:
    """The tenants of a config without [tenants]: one admin tenant "default" without limits."""
    return {"default": TenantSection(admin=True)}


@dataclass(frozen=True)
class SiteConfig:
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    slo: SloSection = field(default_factory=SloSection)
    disagg: DisaggSection = field(default_factory=DisaggSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    auth: AuthSection = field(default_factory=AuthSection)
    tls: TlsSection = field(default_factory=TlsSection)
    tenants: Mapping[str, TenantSection] = field(default_factory=default_tenants)

    def __post_init__(self) -> None:
        self._check_tenants()
        roles, ranks = self.disagg.role_list, self.daemon.ranks
        if roles and len(roles) != ranks:
            raise ConfigError(f"disagg.roles: {self.disagg.roles!r} names {len(roles)} replica(s) but daemon.ranks "
                              f"is {ranks}; make the counts add up to the ranks (or set --ranks {len(roles)})",
                              key="disagg.roles")
        if self.disagg.is_disaggregated and self.daemon.dedicated_chat_replicas:
            raise ConfigError("daemon.dedicated-chat-replicas: cannot be combined with prefill/decode roles "
                              "(disagg.roles); set one of them", key="daemon.dedicated-chat-replicas")

    def _check_tenants(self) -> None:
        for name, policy in self.tenants.items():
            if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
                raise ConfigError(f"tenants.{name}: {_BAD_TENANT_NAME}", key=f"tenants.{name}")
            if not isinstance(policy, TenantSection):
                raise ConfigError(f"tenants.{name}: expected a TenantSection, got {type(policy).__name__}",
                                  key=f"tenants.{name}")
        want = self.auth.endpoint_tenant
        if want and want not in self.tenants:
            defined = ", ".join(self.tenants) or "none"
            raise ConfigError(f"auth.endpoint-tenant: {want!r} is not a defined tenant (defined: {defined}); add a "
                              f'[tenants.{want}] table, or set endpoint-tenant = "" to write no key into '
                              "endpoint.json", key="auth.endpoint-tenant")

    @property
    def keys_path(self) -> Path:
        """The API-keys file: ``auth.keys-file`` expanded, else ``<daemon.state-dir>/keys.json``."""
        if self.auth.keys_file.strip():
            return Path(os.path.expandvars(self.auth.keys_file.strip())).expanduser()
        return self.daemon.state_path / "keys.json"

    def replica_roles(self) -> list[str]:
        """Role of each replica in rank order ("mixed" when disagg.roles is empty)."""
        return self.disagg.role_list or ["mixed"] * self.daemon.ranks

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


_BAD_TENANT_NAME = ("a tenant name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit "
                    '(quote names with dots: [tenants."lab.a"])')


# ---------------------------------------------------------------------------------------------- types
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


def _tenant_sections(src: str, body: Any) -> dict[str, TenantSection]:
    """The file's ``[tenants.NAME]`` tables → {name: TenantSection}; errors name ``tenants.NAME.key``."""
    valid = [_kebab(f.name) for f in fields(TenantSection)]
    if not isinstance(body, dict):
        raise ConfigError(f"{src}: tenants must be a table of tables ([tenants.NAME] followed by key = value "
                          f"lines), got {_toml_type(body)}", key=TENANTS, source=src)
    if not body:
        raise ConfigError(f"{src}: [tenants] defines no tenant; add one [tenants.NAME] table per group, or remove "
                          '[tenants] to get the built-in admin tenant "default"', key=TENANTS, source=src)
    out = {}
    for name, tbody in body.items():
        where = f"tenants.{name}"
        if not isinstance(tbody, dict):
            hint = (f"put {name} = ... under a [tenants.NAME] table; " if name in valid else "")
            raise ConfigError(f"{src}: {where} must be a table ([{where}] followed by key = value lines), got "
                              f"{_toml_type(tbody)}; {hint}each tenant is its own [tenants.NAME] table",
                              key=where, source=src)
        if not TENANT_NAME_RE.fullmatch(name):
            raise ConfigError(f"{src}: {where}: {_BAD_TENANT_NAME}", key=where, source=src)
        kw = {}
        for key, value in tbody.items():
            if key not in valid:
                hint = " (keys are kebab-case)" if key.replace("_", "-") in valid else ""
                raise ConfigError(f"{src}: unknown key {where}.{key}{hint}; {_suggest(key, valid)}"
                                  f"valid keys in [tenants.NAME]: {', '.join(valid)}", key=f"{where}.{key}",
                                  source=src)
            kw[key.replace("-", "_")] = value
        try:
            out[name] = TenantSection(**kw)
        except ConfigError as exc:
            key = (exc.key or TenantSection.TABLE).replace(TenantSection.TABLE, where, 1)
            msg = str(exc).replace(f"{TenantSection.TABLE}.", f"{where}.")
            raise ConfigError(f"{src}: {msg}", key=key, source=src) from None
    return out


def _file_values(path: Path, doc: dict) -> dict[tuple[str, str], Any]:
    """The file's ``(table, field) -> value`` pairs of the _SECTIONS tables ([tenants] is read apart)."""
    src = str(path)
    out: dict[tuple[str, str], Any] = {}
    tables = [*_SECTIONS, TENANTS]
    for table, body in doc.items():
        if table == TENANTS:
            continue
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
    tenants = default_tenants()
    if path is not None:
        path = Path(path)
        doc = _read_toml(path)
        for k, v in _file_values(path, doc).items():
            values[k], sources[k] = v, str(path)
            from_file.add(k)
        if TENANTS in doc:
            tenants = _tenant_sections(str(path), doc[TENANTS])
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
            src = sources.get((t, key.replace("-", "_"))) or next(  # a rule between keys (tls pair): the
                (s for (tt, _), s in sources.items() if tt == t), "defaults")  # source of the key that was set
            raise ConfigError(f"{src}: {exc}", key=exc.key, source=src) from None
    try:
        return SiteConfig(**sections, tenants=tenants)
    except ConfigError as exc:  # a rule across tables: name the key's source, else the file
        t, _, key = (exc.key or "").partition(".")
        src = sources.get((t, key.replace("-", "_"))) or (str(path) if path is not None else "defaults")
        raise ConfigError(f"{src}: {exc}", key=exc.key, source=src) from None


# ------------------------------------------------------------------------------------------- rendering
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
    lines += ["", "# Tenants: one [tenants.NAME] table per group of users, each with its own API keys",
              "# (`hpcserve keys add --tenant NAME`) and limits. The tables listed replace the built-in set,",
              '# which is this one admin tenant "default" without limits.']
    for name, policy in default_tenants().items():
        lines.append(f"[tenants.{name}]")
        for f in fields(TenantSection):
            lines += [f"# {f.metadata['help']}", f"{_kebab(f.name)} = {_toml_value(getattr(policy, f.name))}"]
    return "\n".join(lines) + "\n"


def render_docs_table() -> str:
    """Markdown table of every key: table, key, type, default, meaning (for docs/config.md)."""
    env_of = {v: k for k, v in ENV_VARS.items()}
    rows = ["| table | key | type | default | meaning |", "|---|---|---|---|---|"]
    for table, cls in [*_SECTIONS.items(), ("tenants.NAME", TenantSection)]:
        for f in fields(cls):
            kind, optional = _kind(f)
            kind = "list of str" if kind == _STR_LIST else kind
            key = _kebab(f.name)
            default = "unset" if f.default is MISSING or f.default is None else f"`{_toml_value(f.default)}`"
            meaning = f.metadata["help"].replace("|", "\\|")
            if f"{table}.{key}" in env_of:
                meaning += f" Env: `{env_of[f'{table}.{key}']}`."
            rows.append(f"| `[{table}]` | `{key}` | {kind}{' (optional)' if optional else ''} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"

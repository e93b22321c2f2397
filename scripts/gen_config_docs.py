#!/usr/bin/env python3
"""Regenerate the key table in docs/config.md and site-configs/laptop.toml from hpcserve.config
(run after adding or changing a config key; tests/test_config.py checks both)."""

from pathlib import Path

from hpcserve.config import render_defaults, render_docs_table

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    doc = ROOT / "docs" / "config.md"
    lines = doc.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| table | key |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = render_docs_table().rstrip("\n").split("\n")
    doc.write_text("\n".join(lines))
    laptop = ROOT / "site-configs" / "laptop.toml"
    head = laptop.read_text().split("# hpcserve site config: every key at its default")[0]
    laptop.write_text(head + render_defaults())


if __name__ == "__main__":
    main()

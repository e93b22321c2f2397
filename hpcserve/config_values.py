"""Value kinds of the site-config fields and the one-line type errors about them. No torch.

A field's kind comes from its (string) annotation: ``int``, ``float``, ``bool``, ``str`` or a list
of strings (``tuple[str, ...]``), optionally ``| None``. ``_type_problem(field, value)`` is the
message for a value of the wrong kind (with how to write it); ``_toml_value`` writes a value as
TOML (rendered defaults, docs, suggestions).
"""

from __future__ import annotations

from typing import Any


def _kebab(name: str) -> str:
    """A field name as a TOML key / flag: ``max_num_seqs`` -> ``max-num-seqs``."""
    return name.replace("_", "-")


def _kind(f) -> tuple[str, bool]:
    """("int"|"float"|"bool"|"str", optional) from the field's (string) annotation."""
    t = str(f.type).replace(" ", "")
    return t.replace("|None", ""), "|None" in t


_STR_LIST = "tuple[str,...]"
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               _STR_LIST: "a list of strings"}


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
        _STR_LIST: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
    }[kind]
    if ok:
        return None
    example = f.default if f.default is not None else f.metadata.get("example")
    quotes = " (no quotes)" if kind not in ("str", _STR_LIST) and isinstance(v, str) else ""
    return (f"expected {_KIND_NAMES[kind]}, got {_toml_type(v)} {v!r}; write it like "
            f"{_kebab(f.name)} = {_toml_value(example)}{quotes}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)

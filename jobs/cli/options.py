"""Options shared by several commands."""

from __future__ import annotations

import typer


def parse_storage_options(pairs: list[str] | None) -> dict:
    """`--storage-option KEY=VALUE` (repeatable) as fsspec storage options."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        options[key] = value
    return options

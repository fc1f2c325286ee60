"""What the ``fastad`` command and its ``siamese`` subcommands share: the one-line error type and
the ``--set key=value`` parser. Both command modules import it; neither imports the other's
internals."""

from __future__ import annotations

import json
from typing import Any


class CliError(Exception):
    """A problem worth one line on stderr rather than a traceback."""


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists, true/false,
    null) and as plain strings otherwise."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set expects key=value, got {pair!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params

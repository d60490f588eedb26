"""The one path from a value to a host's shell: every value glmfleet puts into a remote command
goes through :func:`quote` (or :func:`join`), which makes it one literal word whatever it holds
(``;``, ``$(...)``, backticks, spaces, quotes, newlines, globs). Shell syntax itself is written
as literal text in the code; nothing from the configuration or from a host is ever spliced into
a command any other way. ``tests/unit/test_shell_injection.py`` plans every role with hostile
values and checks each one stays one literal word.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping


def quote(value: object) -> str:
    """One literal shell word for ``value`` (its ``str``)."""
    return shlex.quote(str(value))


def join(argv: Iterable[object]) -> str:
    """A command line of literal words."""
    return " ".join(quote(arg) for arg in argv)


def assignments(env: Mapping[str, str]) -> str:
    """``NAME=value`` words that set variables for the command after them. Names are the
    code's own (never a setting's), values are quoted."""
    return " ".join(f"{name}={quote(value)}" for name, value in env.items())


def fail_with(*lines: str) -> str:
    """Print ``lines`` to stderr and fail: a message that may hold any value, never run."""
    return f"printf '%s\\n' {join(lines)} >&2; exit 1"

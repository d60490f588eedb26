"""What the facts' parsers share: sectioned output (one command, several named parts) and the
host scripts of files/, loaded here for the code the controller shares with them."""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

from glmfleet import FILES

SECTION = "::glmfleet::"


def split_sections(output: list[str]) -> dict[str, list[str]]:
    """The lines of a sectioned fact output (``::glmfleet:: NAME`` starts a section)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        if line.startswith(SECTION):
            current = line[len(SECTION) :].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


@functools.cache
def host_script(name: str) -> ModuleType:
    """A script of files/ that runs on the hosts, loaded here for the code the controller shares with it."""
    spec = importlib.util.spec_from_file_location(name, FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Debian packages as dpkg and apt see them."""

from __future__ import annotations

from pyinfra.api import FactBase


class DebPackageStates(FactBase):
    """Installed Debian packages with their version and whether they are held
    (``apt-mark hold``), in one ``dpkg-query``.

    .. code:: python

        {"nvidia-driver": {"version": "535.261.03-1", "held": True}}
    """

    default = dict

    def command(self) -> str:
        return "dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\\n'"

    def process(self, output):
        return parse_dpkg_query(output)


def parse_dpkg_query(lines: list[str]) -> dict[str, dict]:
    """``${db:Status-Abbrev} ${Package} ${Version}`` lines: the first letter is the wanted state
    (``h``: hold), the second the actual state (``i``: installed)."""
    packages = {}
    for line in lines:
        if len(line) < 4 or line[1] != "i":
            continue
        name, _, version = line[4:].partition(" ")
        packages[name] = {"version": version.strip(), "held": line[0] == "h"}
    return packages

"""Who listens on which TCP port, and in which systemd service."""

from __future__ import annotations

from pyinfra.api import FactBase

from glmfleet.shell import quote

# For each line of `ss -Hltnp`: the port of the local address and the service of the first
# holder in one, "-" for none (a socket-activated port is also held by systemd, PID 1, outside
# any service). `proc`: where the holders' /proc entries are. One awk for every listener: a
# shell loop forked five processes per listener.
LISTENER_SERVICE = r"""{
    port = $4; sub(/.*:/, "", port); unit = "-"; holders = $0
    while (unit == "-" && match(holders, /pid=[0-9]+/)) {
        cgroup = proc "/" substr(holders, RSTART + 4, RLENGTH - 4) "/cgroup"
        holders = substr(holders, RSTART + RLENGTH)
        while (unit == "-" && (getline line < cgroup) > 0)
            if (match(line, /[^\/]*\.service/)) unit = substr(line, RSTART, RLENGTH)
        close(cgroup)
    }
    print port, unit
}"""


class ListeningPorts(FactBase):
    """Every listening TCP port and the systemd service whose process holds it (None: a process
    outside any service, or one ``ss`` cannot see), from ``ss`` and the holder's cgroup.

    .. code:: python

        [(22, "ssh.service"), (8000, "vllm.service"), (9000, None)]
    """

    default = list

    def command(self, port: int | None = None) -> str:
        """port: only that port's listeners."""
        only = f" '( sport = :{int(port)} )'" if port else ""
        return f"ss -Hltnp{only} | awk -v proc=/proc {quote(LISTENER_SERVICE)}"

    def requires_command(self, port: int | None = None) -> str:
        return "ss"

    def process(self, output):
        listeners = []
        for line in output:
            port, _, unit = line.partition(" ")
            if port.isdigit():
                listeners.append((int(port), None if unit == "-" else unit))
        return listeners


def port_holders(listeners: list[tuple[int, str | None]], port: int, own_unit: str) -> list[str]:
    """Who other than ``own_unit`` holds ``port`` (the ``ListeningPorts`` answer), in words: a
    service, or a process outside any service."""
    return sorted(
        {
            unit or "a process outside any systemd service"
            for held, unit in listeners
            if held == port and unit != own_unit
        }
    )


class NetworkInterfaces(FactBase):
    """The names of the host's network interfaces (``/sys/class/net``), sorted.

    .. code:: python

        ["eth0", "ib0", "lo"]
    """

    default = list

    def command(self) -> str:
        return "ls -1 /sys/class/net"

    def process(self, output):
        return sorted(line.strip() for line in output if line.strip())

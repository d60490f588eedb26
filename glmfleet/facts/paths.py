"""What a role manages, read in one command: paths, units, users (``ManagedPaths``)."""

from __future__ import annotations

import re

from pyinfra.api import FactBase

from glmfleet.layout import MADE_DIRS_RECORD
from glmfleet.shell import join, quote

# find's %y letters for what roles manage, named as ``stat -c %F`` names them (others stay letters).
FIND_TYPES = {"f": "file", "d": "directory", "l": "symbolic link"}


class ManagedPaths(FactBase):
    """What a role manages on a host, in one command, so that a converged host plans none of
    pyinfra's file, user and service operations (each asks its own facts, a round trip apiece):
    each path's type, owner, group, mode and (regular files) sha256, and its mtime apart; each
    unit's enabled and running state, whether systemd holds an older copy of its file than the
    disk's (``need_reload``), its drop-ins, and when its main process started (unix time, None
    when it runs none); each user's primary group, home and shell. Absent ones are left out.
    With paths, also ``made``: the configured directories glmfleet made (``layout.MADE_DIRS_RECORD``).

    .. code:: python

        {"paths": {"/etc/glmfleet": {"type": "directory", "user": "root", "group": "root", "mode": "700",
                                     "sha256": None},
                   "/etc/glmfleet/vllm.env": {"type": "file", "user": "root", "group": "root", "mode": "600",
                                              "sha256": "9f86d0..."}},
         "mtimes": {"/etc/glmfleet": 1733580000.5, "/etc/glmfleet/vllm.env": 1733580001.25},
         "units": {"vllm.service": {"enabled": True, "running": True, "need_reload": False, "dropins": [],
                                    "started": 1733580002.0}},
         "users": {"vllm": {"group": "vllm", "home": "/var/lib/vllm", "shell": "/usr/sbin/nologin"}},
         "made": ["/var/lib/vllm"]}
    """

    UNIT_PROPERTIES = "UnitFileState,SubState,NeedDaemonReload,DropInPaths,ExecMainStartTimestampMonotonic"

    def command(self, paths: list[str] = (), units: list[str] = (), users: list[str] = ()) -> str:
        # A handful of processes whatever the number of paths: this runs on every host, every run.
        # find -maxdepth 0 reports the paths themselves and never follows a link (a link is not
        # the file wanted there); absent paths are left out. The same find hands the regular
        # files to sha256sum.
        steps = (
            [
                f"find {join(paths)} -maxdepth 0 -printf 'path\\t%p\\t%y|%u|%g|%m\\t%T@\\n' -type f -exec sha256sum -- {{}} + 2>/dev/null",
                f"while read -r made; do printf 'made\\t%s\\n' \"$made\"; done < {quote(MADE_DIRS_RECORD)} 2>/dev/null",
            ]
            if paths
            else []
        )
        if units:  # the realtime and monotonic clocks side by side: a start's monotonic time as unix time
            steps.append('read -r uptime _ < /proc/uptime; printf \'clock\\t%s\\t%s\\n\' "$(date +%s.%N)" "$uptime"')
        for unit in units:  # named as asked: systemctl's Id of an alias (sshd.service) is another name
            quoted = quote(unit)
            steps.append(
                f"printf 'unit\\t%s\\n' {quoted}; systemctl show --property {self.UNIT_PROPERTIES} -- {quoted} 2>/dev/null"
            )
        for user in users:
            quoted = quote(user)
            steps.append(
                f'printf \'user\\t%s\\t%s\\t%s\\n\' {quoted} "$(getent passwd {quoted})" "$(id -gn {quoted} 2>/dev/null)"'
            )
        return "; ".join([*steps, "true"])

    @staticmethod
    def default():
        return {"paths": {}, "mtimes": {}, "units": {}, "users": {}, "made": []}

    @staticmethod
    def merged(asked: list[dict]) -> dict:
        """One question for several roles' (``ask_together``): every path, unit and user once."""
        return {
            kind: list(dict.fromkeys(name for kwargs in asked for name in kwargs.get(kind, ())))
            for kind in ("paths", "units", "users")
        }

    @staticmethod
    def part(answer: dict, paths: list[str] = (), units: list[str] = (), users: list[str] = ()) -> dict:
        """The answer to one role's question, from the merged question's."""
        return {
            **{
                kind: {name: answer[kind][name] for name in names if name in answer[kind]}
                for kind, names in (("paths", paths), ("mtimes", paths), ("units", units), ("users", users))
            },
            "made": answer["made"],
        }

    def process(self, output):
        found = self.default()
        digests, unit, offset = {}, None, None
        for line in output:
            if digest := re.fullmatch(r"([0-9a-f]{64})  (.*)", line):  # sha256sum
                digests[digest[2]] = digest[1]
            elif "=" in line and "\t" not in line and unit:  # systemctl show, for the unit named above
                key, _, value = line.partition("=")
                state = found["units"].setdefault(
                    unit, {"enabled": False, "running": False, "need_reload": False, "dropins": [], "started": None}
                )
                if key == "UnitFileState":
                    state["enabled"] = value == "enabled"
                elif key == "SubState":
                    state["running"] = value == "running"
                elif key == "NeedDaemonReload":
                    state["need_reload"] = value == "yes"
                elif key == "DropInPaths":
                    state["dropins"] = value.split()
                elif key == "ExecMainStartTimestampMonotonic" and value not in ("", "0") and offset is not None:
                    state["started"] = offset + int(value) / 1e6
            else:
                # The output's trailing whitespace may be trimmed: an empty last field goes with it.
                kind, name, first, second = (line.split("\t") + ["", "", ""])[:4]
                if kind == "unit":
                    unit = name
                elif kind == "clock":
                    offset = float(name) - float(first)  # the realtime clock at monotonic zero
                elif kind == "path":
                    file_type, user, group, mode = first.split("|")
                    found["paths"][name] = {
                        "type": FIND_TYPES.get(file_type, file_type),
                        "user": user,
                        "group": group,
                        "mode": mode,
                        "sha256": None,
                    }
                    found["mtimes"][name] = float(second) if second else None
                elif kind == "user" and first:
                    home, shell = first.split(":")[5:7]
                    found["users"][name] = {"group": second, "home": home, "shell": shell}
                elif kind == "made":
                    found["made"].append(name)
        for path, digest in digests.items():
            if found["paths"].get(path, {}).get("type") == "file":
                found["paths"][path]["sha256"] = digest
        return found

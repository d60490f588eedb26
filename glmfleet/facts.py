"""Every fact glmfleet reads from a host, in one place.

Each fact is one SSH round trip (pyinfra caches nothing across runs), so each gathers all it
needs in one command.
"""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

COMPLETE_MARKER = ".glmfleet-complete"


class VllmVenvs(FactBase):
    """The venvs under a glmfleet vLLM root: which are complete, and where ``current`` and
    ``previous`` point, plus whether the pinned uv is installed.

    .. code:: python

        {"uv": True, "current": "vllm-0.22.0-ab12", "previous": None, "complete": ["vllm-0.22.0-ab12"]}
    """

    def command(self, root: str, uv: str) -> str:
        root, uv = shlex.quote(root), shlex.quote(uv)
        return (
            f"test -x {uv} && echo uv=1; "
            f"cd {root} 2>/dev/null || exit 0; "
            "echo current=$(readlink current); echo previous=$(readlink previous); "
            f"for d in venvs/*/; do test -e \"$d{COMPLETE_MARKER}\" && echo complete=$(basename \"$d\"); done; "
            "true"
        )

    def process(self, output):
        state = {"uv": False, "current": None, "previous": None, "complete": []}
        for line in output:
            key, _, value = line.partition("=")
            if key == "uv":
                state["uv"] = True
            elif key in ("current", "previous") and value:
                state[key] = value.rsplit("/", 1)[-1]
            elif key == "complete":
                state["complete"].append(value)
        return state

    def default(self):
        # A fresh host prints nothing (no uv, no root): pyinfra then asks for the default.
        return self.process([])


class VllmServes(FactBase):
    """Whether the vLLM on this host serves right now: the verify script run once, without
    waiting (``/health``, ``/v1/models`` lists the name, one real chat completion).

    Returns ``{"ok": bool, "detail": last line of the script's output}``.
    """

    def command(self, verify_argv: list[str]) -> str:
        script = shlex.quote(verify_argv[0])
        return f"test -x {script} || {{ echo 'verify script not installed'; exit 0; }}; {shlex.join(verify_argv)} --deadline 0 2>&1; echo rc=$?"

    def process(self, output):
        ok = bool(output) and output[-1] == "rc=0"
        detail = output[-2] if len(output) > 1 else (output[0] if output else "")
        return {"ok": ok, "detail": detail}


class ListeningPorts(FactBase):
    """Every listening TCP port and the systemd service whose process holds it (None: a process
    outside any service, or one ``ss`` cannot see), from ``ss`` and the holder's cgroup.

    .. code:: python

        [(22, "ssh.service"), (8000, "vllm.service"), (9000, None)]
    """

    def command(self) -> str:
        return (
            "ss -Hltnp | while read -r _ _ _ local _ users; do "
            "pid=$(printf %s \"$users\" | sed -n 's/.*pid=\\([0-9]*\\).*/\\1/p'); "
            "unit=$(test -n \"$pid\" && grep -o '[^/]*\\.service' /proc/$pid/cgroup 2>/dev/null | head -n 1); "
            "echo \"${local##*:} ${unit:--}\"; done"
        )

    def requires_command(self) -> str:
        return "ss"

    def process(self, output):
        listeners = []
        for line in output:
            port, _, unit = line.partition(" ")
            if port.isdigit():
                listeners.append((int(port), None if unit == "-" else unit))
        return listeners


class Glm4Source(FactBase):
    """The sha256 of vLLM's ``glm4.py`` in a venv (None when the venv has no such file)."""

    def command(self, venv: str) -> str:
        path = f"{shlex.quote(venv)}/lib/python3*/site-packages/vllm/model_executor/models/glm4.py"
        return f"for f in {path}; do test -f \"$f\" && sha256sum \"$f\"; done; true"

    def process(self, output):
        return output[0].split()[0] if output else None

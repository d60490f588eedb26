"""Every fact glmfleet reads from a host, in one place.

Each fact is one SSH round trip (pyinfra caches nothing across runs), so each gathers all it
needs in one command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

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

    @staticmethod
    def default():
        return {"uv": False, "current": None, "previous": None, "complete": []}

    def process(self, output):
        state = self.default()
        for line in output:
            key, _, value = line.partition("=")
            if key == "uv":
                state["uv"] = True
            elif key in ("current", "previous") and value:
                state[key] = value.rsplit("/", 1)[-1]
            elif key == "complete":
                state["complete"].append(value)
        return state


class VllmServes(FactBase):
    """Whether the vLLM on this host serves right now: the verify script run once, without
    waiting (``/health``, ``/v1/models`` lists the name, one real chat completion).

    Returns ``{"ok": bool, "detail": last line of the script's output}``.
    """

    def command(self, verify_argv: list[str]) -> str:
        script = shlex.quote(verify_argv[0])
        return f"test -x {script} || {{ echo 'verify script not installed'; exit 0; }}; {shlex.join(verify_argv)} --deadline 0 2>&1; echo rc=$?"

    @staticmethod
    def default():
        return {"ok": False, "detail": "no answer"}

    def process(self, output):
        ok = bool(output) and output[-1] == "rc=0"
        detail = output[-2] if len(output) > 1 else (output[0] if output else "")
        return {"ok": ok, "detail": detail}


# files/vllm_status.py runs inline, so it answers on hosts glmfleet never deployed to.
STATUS_PROGRAM = (Path(__file__).resolve().parent.parent / "files" / "vllm_status.py").read_text()


def vllm_status_command(*args: str) -> str:
    """A shell command that runs files/vllm_status.py on the host with the system Python."""
    return f"python3 -c {shlex.quote(STATUS_PROGRAM)} {shlex.join(args)}"


class VllmUnit(FactBase):
    """A vLLM unit file, parsed: what ExecStart serves and where it listens (None if absent).

    .. code:: python

        {"path": "/etc/systemd/system/vllm.service", "sha256": "...", "venv": "vllm-0.22.0-ab12",
         "model": "zai-org/GLM-4-9B-0414", "revision": None, "served_model_name": "zai-org/GLM-4-9B-0414",
         "tensor_parallel_size": 1, "base_url": "http://127.0.0.1:8000", "argv": [...]}
    """

    def command(self, path: str) -> str:
        return vllm_status_command("unit", path)

    def process(self, output):
        return json.loads("\n".join(output))


class VllmStatus(FactBase):
    """Everything `glmfleet status` shows about a host's vLLM, in one round trip: the unit
    parsed (as ``VllmUnit``), the service's systemd state, ``/version``, ``/health``, requests in
    flight from ``/metrics`` (running + waiting), and the GPUs from ``nvidia-smi``.

    .. code:: python

        {"unit": {...} or None, "service": {"ActiveState": "active", "SubState": "running", ...},
         "health": 200 or "why there was no answer", "version": "0.22.0" or None, "in_flight": 0 or None,
         "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 0, ...}] or None,
         "gpu_error": None or "no nvidia-smi"}
    """

    def command(self, path: str) -> str:
        return vllm_status_command("status", path)

    def process(self, output):
        return json.loads("\n".join(output))

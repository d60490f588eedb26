"""vLLM on a host: its venvs, whether it serves, its unit parsed, its status, and 0.8.4's glm4.py."""

from __future__ import annotations

import json

from pyinfra.api import FactBase

from glmfleet import FILES
from glmfleet.layout import COMPLETE_MARKER
from glmfleet.shell import join, quote


class VllmVenvs(FactBase):
    """The venvs under a glmfleet vLLM root: which are complete (the completion marker there,
    and every file it records there: the interpreter, the vllm entry point, the package's
    metadata and module), and where ``current`` and ``previous`` point, plus whether the pinned
    uv is installed.

    .. code:: python

        {"uv": True, "current": "vllm-0.22.0-ab12", "previous": None, "complete": ["vllm-0.22.0-ab12"]}
    """

    def command(self, root: str, uv: str) -> str:
        root, uv = quote(root), quote(uv)
        return (
            f"test -x {uv} && echo uv=1; "
            f"cd {root} 2>/dev/null || exit 0; "
            # One find for both links (readlink was a process each): an absent one prints nothing, a
            # non-link an empty target.
            "find current previous -maxdepth 0 -printf '%f=%l\\n' 2>/dev/null; "
            # ${d%/} and ${d##*/}, not basename: every host runs this every run, a process per venv.
            # A marker's record, a relative path a line (no spaces: bin/, lib/python3.X/site-packages/),
            # must all be there; test -e follows the interpreter's link: a python gone is a venv gone.
            # An empty marker (an older glmfleet's) records the interpreter and the entry point.
            f'for d in venvs/*/; do m="$d{COMPLETE_MARKER}"; test -e "$m" || continue; whole=1; '
            'for f in bin/python bin/vllm; do test -e "$d$f" || whole=; done; '
            'while read -r f; do test -e "$d$f" || whole=; done < "$m"; '
            'test -n "$whole" && { d=${d%/}; echo complete=${d##*/}; }; done; '
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
    waiting (one real chat completion; ``/health`` and ``/v1/models`` where it is answered with an
    error). The deploy makes the same check from the controller where it can (``roles.verify.serving_now``).

    Returns ``{"ok": bool, "detail": last line of the script's output}``.
    """

    def command(self, verify_argv: list[str]) -> str:
        script = quote(verify_argv[0])
        return f"test -x {script} || {{ echo 'verify script not installed'; exit 0; }}; {join(verify_argv)} --deadline 0 2>&1; echo rc=$?"

    @staticmethod
    def default():
        return {"ok": False, "detail": "no answer"}

    def process(self, output):
        ok = bool(output) and output[-1] == "rc=0"
        detail = output[-2] if len(output) > 1 else (output[0] if output else "")
        return {"ok": ok, "detail": detail}


class Glm4Source(FactBase):
    """The sha256 of vLLM's ``glm4.py`` in a venv (None when the venv has no such file)."""

    def command(self, venv: str) -> str:
        path = f"{quote(venv)}/lib/python3*/site-packages/vllm/model_executor/models/glm4.py"
        return f'for f in {path}; do test -f "$f" && sha256sum "$f"; done; true'

    def process(self, output):
        return output[0].split()[0] if output else None


# files/vllm_status.py runs inline, so it answers on hosts glmfleet never deployed to.
STATUS_PROGRAM = (FILES / "vllm_status.py").read_text()


def vllm_status_command(*args: str) -> str:
    """A shell command that runs files/vllm_status.py on the host with the system Python."""
    return f"python3 -c {quote(STATUS_PROGRAM)} {join(args)}"


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

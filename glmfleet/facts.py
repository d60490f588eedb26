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

"""Every fact glmfleet reads from a host, in one place.

Each fact is one SSH round trip (pyinfra caches nothing across runs), so each gathers all it
needs in one command.
"""

from __future__ import annotations

import json
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


class ModelWeights(FactBase):
    """One model revision's state on this host, from the weights script's host-local state
    (no hashing: a stat per file), plus which hub CLIs are installed and the host's SSH host
    key (the other hosts' known_hosts for peer copies).

    .. code:: python

        {"complete": False, "reason": "files changed since verified", "changed": ["model-00003-of-00005.safetensors"],
         "tools": ["/opt/glmfleet/huggingface_hub-2.4.0/bin/hf"], "host_key": "ssh-ed25519 AAAA..."}
    """

    def command(self, script: str, state_args: list[str], tools: list[str]) -> str:
        return (
            f"for tool in {shlex.join(tools)}; do test -x \"$tool\" && echo \"tool=$tool\"; done; "
            "echo \"host_key=$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null)\"; "
            f"test -x {shlex.quote(script)} && echo \"state=$({shlex.join([script, 'state', *state_args])} 2>&1)\"; true"
        )

    @staticmethod
    def default():
        return {"complete": False, "reason": "never fetched", "changed": [], "tools": [], "host_key": ""}

    def process(self, output):
        found = self.default()
        for line in output:
            key, _, value = line.partition("=")
            if key == "tool":
                found["tools"].append(value)
            elif key == "host_key":
                found["host_key"] = value
            elif key == "state":
                try:
                    found.update(json.loads(value))
                except ValueError:
                    found["reason"] = f"unreadable state: {value[:200]}"
        return found

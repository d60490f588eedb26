"""One model revision's weights on a host, judged by the host script's own rules."""

from __future__ import annotations

import json

from pyinfra.api import FactBase

from glmfleet.facts.output import SECTION, host_script, split_sections
from glmfleet.layout import ROOT_AUTHORIZED_KEYS, SSH_HOST_KEY_PUB
from glmfleet.shell import join, quote


class ModelWeights(FactBase):
    """One model revision's state on this host: the weights script's host-local state file and
    a stat of every file in the model directory (no hashing), judged here by the script's own
    ``completion``; plus which hub CLIs are installed, the host's SSH host key (the other
    hosts' known_hosts for peer copies), and the lines of root's authorized_keys that hold one
    of ``transfer_marks`` (glmfleet's transfer keys). Shell only: a Python started on every
    host on every run was a quarter of a converged host's CPU per deploy (benchmarks/RESULTS.md).

    .. code:: python

        {"complete": False, "reason": "files changed since verified", "changed": ["model-00003-of-00005.safetensors"],
         "tools": ["/opt/glmfleet/huggingface_hub-2.4.0/bin/hf"], "host_key": "ssh-ed25519 AAAA...",
         "authorized": ['restrict,command="/opt/glmfleet/bin/glmfleet-weights give --store /var/lib/glmfleet/models" ssh-ed25519 AAAA... glmfleet-peer-transfer']}
    """

    def command(
        self, state_file: str, model_dir: str, key: str, tools: list[str], transfer_marks: list[str] = ()
    ) -> str:
        marks = " ".join(f"-e {quote(mark)}" for mark in transfer_marks)
        return "; ".join(
            [
                f"echo '{SECTION} key'",
                f"echo {quote(key)}",
                f"echo '{SECTION} tools'",
                f'for tool in {join(tools)}; do test -x "$tool" && echo "$tool"; done',
                f"echo '{SECTION} host_key'",
                f'{{ read -r type key _; [ -n "$key" ] && echo "$type $key"; }} 2>/dev/null < {quote(SSH_HOST_KEY_PUB)}',
                f"echo '{SECTION} authorized'",
                *([f"grep -F {marks} {quote(ROOT_AUTHORIZED_KEYS)} 2>/dev/null"] if transfer_marks else []),
                f"echo '{SECTION} state'",
                f"cat {quote(state_file)} 2>/dev/null && echo",
                # The script's stat_of: -L follows links as os.stat does (a model dir or files that
                # link into a hub cache); %T@ and %C@ are seconds with nanoseconds (and one digit more).
                f"echo '{SECTION} files'",
                f"find -L {quote(model_dir)} -type f -printf '%P\\t%s\\t%T@\\t%C@\\t%i\\n' 2>/dev/null",
                "true",
            ]
        )

    @staticmethod
    def default():
        return {
            "complete": False,
            "reason": "never fetched",
            "changed": [],
            "tools": [],
            "host_key": "",
            "authorized": [],
        }

    def process(self, output):
        sections = split_sections(output)
        found = {
            **self.default(),
            "tools": sections.get("tools", []),
            "host_key": "".join(sections.get("host_key", [])),
            "authorized": sections.get("authorized", []),
        }
        try:
            data = json.loads("\n".join(sections.get("state", [])) or "{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return {**found, "reason": f"unreadable state file: {' '.join(sections['state'])[:200]}"}
        stats = dict(filter(None, map(stat_line, sections.get("files", []))))
        return {
            **found,
            **host_script("glmfleet_weights").completion(data, "".join(sections.get("key", [])), stats.get),
        }


def stat_line(line: str) -> tuple[str, list[int]] | None:
    """``find -printf '%P\\t%s\\t%T@\\t%C@\\t%i'`` as (path, [size, mtime_ns, ctime_ns, inode]);
    None for a line that is not one (part of a file name with a newline: that file counts as gone)."""
    try:
        path, size, mtime, ctime, inode = line.rsplit("\t", 4)
        return path, [int(size), nanoseconds(mtime), nanoseconds(ctime), int(inode)]
    except ValueError:
        return None


def nanoseconds(stamp: str) -> int:
    """``1795343173.4162346820`` (find's %T@) as an exact integer of nanoseconds."""
    seconds, _, fraction = stamp.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))

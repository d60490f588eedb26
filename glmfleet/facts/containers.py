"""Docker on a host: its daemon.json, the GPUs' CDI spec, one image's id."""

from __future__ import annotations

import json

from pyinfra.api import FactBase

from glmfleet.facts.output import SECTION, split_sections
from glmfleet.shell import quote


class ContainerHost(FactBase):
    """Docker on this host: its daemon.json (parsed; ``None`` when absent, ``"invalid"`` when
    not JSON), whether the CDI spec of the NVIDIA GPUs exists, and the image id of one image.

    .. code:: python

        {"daemon_json": {"runtimes": {...}}, "cdi_spec": False, "image_id": "sha256:..." or None}
    """

    def command(self, image: str, cdi_spec: str) -> str:
        return "; ".join(
            [
                f"echo '{SECTION} daemon_json'",
                "cat /etc/docker/daemon.json 2>/dev/null",
                f"echo '{SECTION} cdi_spec'",
                f"test -s {quote(cdi_spec)} && echo present",
                f"echo '{SECTION} image'",
                f"command -v docker >/dev/null && docker image inspect --format '{{{{.Id}}}}' {quote(image)} 2>/dev/null",
                "true",
            ]
        )

    def process(self, output):
        sections = split_sections(output)
        text = "\n".join(sections.get("daemon_json", [])).strip()
        try:
            daemon_json = json.loads(text) if text else None
        except ValueError:
            daemon_json = "invalid"
        image = [line for line in sections.get("image", []) if line.startswith("sha256:")]
        return {
            "daemon_json": daemon_json,
            "cdi_spec": "present" in sections.get("cdi_spec", []),
            "image_id": image[0] if image else None,
        }

    def default(self):
        return self.process([])

"""glm4_patch: vLLM 0.8.4's broken glm4.py (the GLM-4-0414 models) fixed on the host, safely."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Sha256File
from pyinfra.operations import files, server

from glmfleet import FILES
from glmfleet.compat import GLM4_BROKEN_IN, needs_glm4_patch
from glmfleet.config import HostConfig, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.packages import DebPackageStates
from glmfleet.facts.vllm import Glm4Source
from glmfleet.layout import GLM4_PATCH as PATCH
from glmfleet.layout import GLM4_PATCH_SCRIPT as SCRIPT
from glmfleet.layout import IMAGE_GLM4
from glmfleet.layout import PATCHED_GLM4 as PATCHED_FOR_IMAGE
from glmfleet.operations import apt_install, packages_due
from glmfleet.shell import join, quote
from roles.vllm_image import image_ref
from roles.vllm_venv import venv_dir

BUGGY_VERSION = GLM4_BROKEN_IN
ORIGINAL_SHA256 = "7c495ea634a8ed95cfd109a021affdb7ae38dea4a788ceb4348c25398a6d0ed6"  # 0.8.4's wheel
PATCHED_SHA256 = "c8b7dc47c6522b0535a411715d0b03a329b57a07ff545ffad670cde509a2a730"  # after files/glm4-0.8.4.patch
CHECKSUMS = ["--original", ORIGINAL_SHA256, "--patched", PATCHED_SHA256]


def needs_patch(cfg: HostConfig) -> bool:
    return needs_glm4_patch(cfg)


def questions(cfg: HostConfig) -> dict[str, Question]:
    if not needs_patch(cfg):
        return {}
    patched = (
        Question(Sha256File, {"path": PATCHED_FOR_IMAGE})
        if cfg.vllm_runtime == "image"
        else Question(Glm4Source, {"venv": venv_dir(cfg)})
    )
    return {"patched_sha256": patched, "debs": Question(DebPackageStates, {})}


def derive_command(image: str) -> str:
    """Image runtime: copy glm4.py out of the image and write the patched file from it; the
    script refuses any copy that is not 0.8.4's original."""
    copied = f"{PATCHED_FOR_IMAGE}.image"
    return (
        f"set -e; id=$(docker create {quote(image)}); trap 'docker rm \"$id\" >/dev/null' EXIT; "
        f'docker cp "$id:"{quote(IMAGE_GLM4)} {quote(copied)}; '
        + join(["python3", SCRIPT, "derive", *CHECKSUMS, PATCH, copied, PATCHED_FOR_IMAGE])
        + f"; rm -f {quote(copied)}"
    )


@deploy("glm4.py patch")
def glm4_patch():
    """
    Patch ``glm4.py`` of the pinned vLLM when that is 0.8.4, whose copy is broken: in the venv,
    or, for the image, a patched copy derived from the image's own that the unit lays over it.

    The script on the host patches only a file with the known original sha256, checks the
    result's sha256, keeps the original as ``glm4.py.orig`` and refuses anything else, which
    fails the host with nothing changed. A patched venv is left alone (no operation at all);
    any other vLLM release is never touched.

    Returns the operations whose change means the service must restart.
    """
    cfg = host_config(host)
    if not needs_patch(cfg):
        return []
    answers = ask_together(host, questions(cfg))
    if answers["patched_sha256"] == PATCHED_SHA256:
        return []
    if packages_due(answers["debs"], {"patch": None}):
        apt_install(name="GNU patch", packages={"patch": None})
    files.put(name="glm4.py patch script", src=str(FILES / "glm4_patch.py"), dest=SCRIPT, mode="755")
    files.put(name="glm4.py patch", src=str(FILES / "glm4-0.8.4.patch"), dest=PATCH, mode="644")
    if cfg.vllm_runtime == "image":
        files.directory(name="patched glm4.py directory", path=PATCHED_FOR_IMAGE.rsplit("/", 1)[0], mode="755")
        return [server.shell(name=f"patched glm4.py from {image_ref(cfg)}", commands=[derive_command(image_ref(cfg))])]
    venv = venv_dir(cfg)
    return [
        server.shell(
            name=f"patch glm4.py of vLLM {BUGGY_VERSION} in {venv}",
            commands=[join([f"{venv}/bin/python", SCRIPT, "apply", "--vllm", BUGGY_VERSION, *CHECKSUMS, PATCH])],
        )
    ]

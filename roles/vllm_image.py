"""vllm_image: the official vLLM container image, pinned, pulled or loaded from a shipped archive."""

from __future__ import annotations

import json
import tarfile
from functools import cache
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from glmfleet import checks
from glmfleet.compat import needs_glm4_patch
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.containers import ContainerHost
from glmfleet.facts.engine import Question, ask_together
from glmfleet.layout import CDI_SPEC, CONTAINER, DOCKER, ENV_FILE, IMAGE_GLM4, PATCHED_GLM4
from glmfleet.layout import IMAGE_ARCHIVE_DIR as ARCHIVE_DIR
from glmfleet.shell import quote
from roles.vllm_venv import state_dirs, state_dirs_question

# A repository, optionally on a registry: ``vllm/vllm-openai``, ``mirror.example:5000/vllm/vllm-openai``.
image_name_check = checks.matches(r"[a-z0-9]+([._:/-][a-z0-9]+)*", "an image name such as 'vllm/vllm-openai'")
archive_path = checks.Check(
    lambda v: checks.local_path(v) and v.endswith((".tar", ".tar.gz", ".tgz")), "a path ending in .tar or .tar.gz"
)

SETTINGS = (
    Setting(
        "vllm_image",
        "vllm/vllm-openai",
        "the vLLM image repository (a registry mirror's, on mirror-only sites)",
        image_name_check,
    ),
    Setting(
        "vllm_image_tag",
        None,
        "the image tag (default: 'v' + vllm_version, as vLLM tags its releases)",
        checks.optional(checks.matches(r"[\w.-]+", "a tag such as 'v0.22.0'")),
    ),
    Setting(
        "vllm_image_digest",
        None,
        "the recorded manifest digest: pull and run exactly this image",
        checks.optional(checks.matches(r"sha256:[0-9a-f]{64}", "'sha256:' and 64 hex digits")),
    ),
    Setting(
        "vllm_image_archive",
        None,
        "a `docker save` archive on the control node, loaded instead of pulling "
        "(air-gapped sites); it must hold the tagged image",
        checks.optional(archive_path),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    if cfg["vllm_runtime"] != "image":
        return []
    found = []
    if cfg["vllm_image_archive"] and cfg["vllm_image_digest"]:
        found.append(
            "vllm_image_digest pins a registry pull, but vllm_image_archive is set: `docker load` keeps no "
            "registry digest; the archive's own image id is checked instead, so leave vllm_image_digest unset"
        )
    archive = cfg["vllm_image_archive"]
    if archive and not Path(archive).is_file():
        found.append(f"vllm_image_archive = {archive!r} is not a file on this control node")
    elif archive:
        tagged = image_name(cfg)
        try:
            tags = archive_image(archive)["tags"]
        except (OSError, tarfile.TarError, ValueError, KeyError) as error:
            found.append(f"vllm_image_archive = {archive!r} is not a `docker save` archive ({error})")
        else:
            if tagged not in tags:
                found.append(
                    f"vllm_image_archive = {archive!r} holds {tags}, not {tagged}; set vllm_image/"
                    "vllm_image_tag to the archive's tag"
                )
    return found


def image_tag(cfg) -> str:
    return cfg["vllm_image_tag"] or f"v{cfg['vllm_version']}"


def image_name(cfg) -> str:
    """``repository:tag``: the name the image is pulled, loaded and tagged as."""
    return f"{cfg['vllm_image']}:{image_tag(cfg)}"


def image_ref(cfg: HostConfig) -> str:
    """What the unit runs: the recorded digest when there is one, else the tag."""
    return f"{cfg.vllm_image}@{cfg.vllm_image_digest}" if cfg.vllm_image_digest else image_name(cfg)


@cache
def archive_image(path: str) -> dict:
    """The image id (its config's sha256) and tags of a `docker save` archive, read from its
    manifest.json: what `docker load` will report, so a loaded image can be recognised."""
    with tarfile.open(path) as archive:
        member = archive.extractfile("manifest.json")
        if member is None:
            raise ValueError("no manifest.json")
        manifest = json.load(member)
    if len(manifest) != 1:
        raise ValueError(f"{len(manifest)} images in the archive; glmfleet loads one")
    config = manifest[0]["Config"]
    digest = config.rsplit("/", 1)[-1].removesuffix(".json")
    return {"id": f"sha256:{digest}", "tags": manifest[0].get("RepoTags") or []}


def image_volumes(cfg) -> list[str]:
    """vLLM 0.8.4's broken glm4.py: the patched copy laid read-only over the image's own
    (roles/glm4_patch.py makes it)."""
    return ["--volume", f"{PATCHED_GLM4}:{IMAGE_GLM4}:ro"] if needs_glm4_patch(cfg) else []


def docker_run(cfg: HostConfig) -> list[str]:
    """``docker run`` in the foreground (systemd supervises it) with the GPUs, host networking
    and IPC (vLLM's shared memory), the state directory (Hugging Face and compile caches) at the
    same path as on the host, the model directory read-only, and the environment from the
    root-only file: no secret on the command line."""
    gpus = ["--device", "nvidia.com/gpu=all"] if cfg.container_gpu_access == "cdi" else ["--gpus", "all"]
    mounts = ["--volume", f"{cfg.vllm_state_dir}:{cfg.vllm_state_dir}"]
    if cfg.model_dir:
        mounts += ["--volume", f"{cfg.model_dir}:{cfg.model_dir}:ro"]
    mounts += image_volumes(cfg)
    return [
        DOCKER,
        "run",
        "--rm",
        "--name",
        CONTAINER,
        *gpus,
        "--network",
        "host",
        "--ipc",
        "host",
        "--ulimit",
        "memlock=-1",
        "--ulimit",
        "nofile=65536",
        *mounts,
        "--env-file",
        ENV_FILE,
        "--entrypoint",
        "vllm",
        image_ref(cfg),
    ]


def containers_question(cfg: HostConfig) -> Question:
    """ContainerHost, asked the same way by this role and the container toolkit's (so once)."""
    return Question(ContainerHost, {"image": image_ref(cfg), "cdi_spec": CDI_SPEC})


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.vllm_runtime != "image":
        return {}
    return {"containers": containers_question(cfg), "state_dirs": state_dirs_question(cfg)}


@deploy("vLLM image")
@documented(SETTINGS)
def vllm_image():
    """
    Make the pinned vLLM image present: pulled by tag or recorded digest, or, with
    ``vllm_image_archive``, uploaded from the control node and ``docker load``-ed (air-gapped
    sites). An image already present under its id is left alone: no upload, no hashing.
    Applies when ``vllm_runtime`` is ``image``.

    Returns the operations whose change means the service must restart.
    """
    cfg = host_config(host)
    if cfg.vllm_runtime != "image":
        return []
    answers = ask_together(host, questions(cfg))
    state_dirs(cfg, answers["state_dirs"])
    present = answers["containers"]["image_id"]
    if not cfg.vllm_image_archive:
        if present:
            return []
        return [server.shell(name=f"pull {image_ref(cfg)}", commands=[f"docker pull {quote(image_ref(cfg))}"])]
    wanted = archive_image(cfg.vllm_image_archive)["id"]
    if present == wanted:
        return []
    remote = f"{ARCHIVE_DIR}/image.tar" + (".gz" if cfg.vllm_image_archive.endswith((".gz", ".tgz")) else "")
    files.directory(name="image archive directory", path=ARCHIVE_DIR, user="root", group="root", mode="700")
    files.put(name=f"upload {cfg.vllm_image_archive}", src=cfg.vllm_image_archive, dest=remote, mode="600")
    loaded = server.shell(
        name=f"docker load {image_name(cfg)} ({wanted[:19]})",
        commands=[
            f"docker load --input {quote(remote)} && rm -f {quote(remote)} && "
            f"test \"$(docker image inspect --format '{{{{.Id}}}}' {quote(image_name(cfg))})\" = {quote(wanted)}"
        ],
    )
    return [loaded]

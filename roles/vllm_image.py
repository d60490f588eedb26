"""vllm_image: the official vLLM container image, pinned, pulled or loaded from a shipped archive."""

from __future__ import annotations

import json
import re
import tarfile
from functools import cache
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from glmfleet.config import HostConfig, Setting, documented, host_config, is_str, optional
from glmfleet.facts import ContainerHost, Question, ask_together
from roles import glm4_patch
from roles.vllm_venv import state_dirs, state_dirs_question

CONTAINER = "vllm"
ARCHIVE_DIR = "/var/lib/glmfleet/images"
# The container toolkit writes it; the container reaches the GPUs through it (container_gpu_access cdi).
CDI_SPEC = "/etc/cdi/nvidia.yaml"


def is_image_name(value) -> bool:
    """A repository, optionally on a registry: ``vllm/vllm-openai``, ``mirror.example:5000/vllm/vllm-openai``."""
    return is_str(value) and re.fullmatch(r"[a-z0-9]+([._:/-][a-z0-9]+)*", value) is not None


def is_digest(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


def is_archive_path(value) -> bool:
    return is_str(value) and value.endswith((".tar", ".tar.gz", ".tgz")) and "\n" not in value


SETTINGS = (
    Setting("vllm_image", "vllm/vllm-openai", "the vLLM image repository (a registry mirror's, on mirror-only sites)",
            "an image name such as 'vllm/vllm-openai'", is_image_name),
    Setting("vllm_image_tag", None, "the image tag (default: 'v' + vllm_version, as vLLM tags its releases)",
            "None or a tag such as 'v0.22.0'", optional(lambda v: is_str(v) and re.fullmatch(r"[\w.-]+", v))),
    Setting("vllm_image_digest", None, "the recorded manifest digest: pull and run exactly this image",
            "None or 'sha256:' and 64 hex digits", optional(is_digest)),
    Setting("vllm_image_archive", None, "a `docker save` archive on the control node, loaded instead of pulling "
            "(air-gapped sites); it must hold the tagged image", "None or a path ending in .tar or .tar.gz",
            optional(is_archive_path)),
)


def combination_problems(cfg: dict) -> list[str]:
    if cfg["vllm_runtime"] != "image":
        return []
    found = []
    if cfg["vllm_image_archive"] and cfg["vllm_image_digest"]:
        found.append("vllm_image_digest pins a registry pull, but vllm_image_archive is set: `docker load` keeps no "
                     "registry digest; the archive's own image id is checked instead, so leave vllm_image_digest unset")
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
                found.append(f"vllm_image_archive = {archive!r} holds {tags}, not {tagged}; set vllm_image/"
                             "vllm_image_tag to the archive's tag")
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


def docker_run(cfg: HostConfig, env_file: str) -> list[str]:
    """``docker run`` in the foreground (systemd supervises it) with the GPUs, host networking
    and IPC (vLLM's shared memory), the state directory (Hugging Face and compile caches) at the
    same path as on the host, the model directory read-only, and the environment from the
    root-only file: no secret on the command line."""
    gpus = ["--device", "nvidia.com/gpu=all"] if cfg.container_gpu_access == "cdi" else ["--gpus", "all"]
    mounts = ["--volume", f"{cfg.vllm_state_dir}:{cfg.vllm_state_dir}"]
    if cfg.model_dir:
        mounts += ["--volume", f"{cfg.model_dir}:{cfg.model_dir}:ro"]
    mounts += glm4_patch.image_volumes(cfg)
    return [
        "/usr/bin/docker", "run", "--rm", "--name", CONTAINER, *gpus,
        "--network", "host", "--ipc", "host", "--ulimit", "memlock=-1", "--ulimit", "nofile=65536",
        *mounts, "--env-file", env_file, "--entrypoint", "vllm", image_ref(cfg),
    ]


def containers_question(cfg: HostConfig) -> Question:
    """ContainerHost, asked the same way by this role and the container toolkit's (so once)."""
    return Question(ContainerHost, {"image": image_ref(cfg), "cdi_spec": CDI_SPEC})


def questions(cfg: HostConfig) -> dict[str, Question]:
    """What this role reads from the host, by name; ``roles.serving_host`` asks every role's in one command."""
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
        return [server.shell(name=f"pull {image_ref(cfg)}", commands=[f"docker pull {image_ref(cfg)}"])]
    wanted = archive_image(cfg.vllm_image_archive)["id"]
    if present == wanted:
        return []
    remote = f"{ARCHIVE_DIR}/{Path(cfg.vllm_image_archive).name}"
    files.directory(name="image archive directory", path=ARCHIVE_DIR, user="root", group="root", mode="700")
    files.put(name=f"upload {cfg.vllm_image_archive}", src=cfg.vllm_image_archive, dest=remote, mode="600")
    loaded = server.shell(
        name=f"docker load {image_name(cfg)} ({wanted[:19]})",
        commands=[
            f"docker load --input {remote} && rm -f {remote} && "
            f"test \"$(docker image inspect --format '{{{{.Id}}}}' {image_name(cfg)})\" = {wanted}"
        ],
    )
    return [loaded]

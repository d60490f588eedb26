"""container_toolkit: Docker and the NVIDIA Container Toolkit, for the image runtime of vLLM."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import checks
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.packages import DebPackageStates
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import CDI_SPEC, DOCKER_DAEMON_JSON
from glmfleet.operations import (
    apt_hold,
    apt_install,
    apt_repository,
    apt_repository_question,
    packages_due,
    planned,
    repository_due,
    stop_host,
    unheld,
    unit_enabled,
)
from glmfleet.shell import quote
from roles.nvidia_driver import DriverState, gpu_question
from roles.vllm_image import containers_question

DOCKER_REPO = "https://download.docker.com/linux/{distro}"
TOOLKIT_REPO = "https://nvidia.github.io/libnvidia-container"
# NVIDIA's install guide pins these four together, at one version.
TOOLKIT_PACKAGES = [
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
]
DOCKER_PACKAGES = {"distro": ["docker.io"], "docker-repo": ["docker-ce", "docker-ce-cli", "containerd.io"]}
DOCKER_UNIT = "docker.service"


def apt_version(example: str) -> checks.Check:
    """An apt version, or a glob of versions as ``apt-get install package=GLOB`` takes it."""
    return checks.matches(r"[0-9][A-Za-z0-9.+~:*?-]*", f"an apt version such as {example!r}")


SETTINGS = (
    Setting(
        "docker_source",
        "docker-repo",
        "where Docker comes from: Docker's apt repository (current engine, CDI "
        "on by default from 28) or the distro's docker.io (Debian 12: 20.10, no CDI)",
        checks.one_of("docker-repo", "distro"),
    ),
    Setting(
        "docker_version",
        "5:28.5.1-1~*",
        "Docker engine version, an apt version or glob (docker-repo: "
        "'5:28.5.1-1~*'; distro: e.g. '20.10.24+dfsg1-*'); None takes the newest at install time",
        checks.optional(apt_version("5:28.5.1-1~*")),
    ),
    Setting(
        "docker_repo_url",
        DOCKER_REPO,
        "Docker's apt repository (or a mirror); {distro} becomes ubuntu or debian",
        checks.url_template("distro"),
    ),
    Setting(
        "docker_repo_key_url",
        DOCKER_REPO + "/gpg",
        "Docker's signing key (same placeholder)",
        checks.url_template("distro"),
    ),
    Setting(
        "docker_repo_key_sha256",
        None,
        "sha256 of that key file; when set, another key is refused",
        checks.optional(checks.sha256),
    ),
    Setting(
        "nvidia_container_toolkit_version",
        "1.17.8-1",
        "NVIDIA Container Toolkit version (all four packages)",
        apt_version("1.17.8-1"),
    ),
    Setting(
        "nvidia_container_toolkit_repo_url",
        TOOLKIT_REPO + "/stable/deb/{arch}",
        "the toolkit's apt repository (or a mirror); {arch} becomes amd64 or arm64",
        checks.url_template("arch"),
    ),
    Setting(
        "nvidia_container_toolkit_key_url",
        TOOLKIT_REPO + "/gpgkey",
        "the toolkit repository's signing key",
        checks.url_template("arch"),
    ),
    Setting(
        "nvidia_container_toolkit_key_sha256",
        None,
        "sha256 of that key file; when set, another key is refused",
        checks.optional(checks.sha256),
    ),
    Setting(
        "container_gpu_access",
        "cdi",
        "how the vLLM container gets its GPUs: CDI devices (survive "
        "`systemctl daemon-reload`, need Docker 25+) or `--gpus` (any Docker with the toolkit)",
        checks.one_of("cdi", "gpus"),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    found = []
    if cfg["vllm_runtime"] != "image" or cfg["docker_source"] != "distro":
        return found
    if (cfg["docker_version"] or "").startswith("5:"):
        found.append(
            f"docker_version = {cfg['docker_version']!r} is a version of Docker's repository, not of the "
            "distro's docker.io; with docker_source: distro set docker_version to a docker.io version "
            "(e.g. '20.10.24+dfsg1-*') or None"
        )
    if cfg["container_gpu_access"] == "cdi":
        found.append(
            "docker_source = 'distro' with container_gpu_access = 'cdi': Debian 12's and Ubuntu 22.04's "
            "docker.io predate CDI; set docker_source: docker-repo, or container_gpu_access: gpus"
        )
    return found


def runtime_configured(daemon_json, cdi: bool) -> bool:
    """daemon.json already names the nvidia runtime (and enables CDI when it is used)."""
    if not isinstance(daemon_json, dict):
        return False
    nvidia = daemon_json.get("runtimes", {}).get("nvidia", {})
    return bool(nvidia.get("path")) and (not cdi or daemon_json.get("features", {}).get("cdi") is True)


def configure_runtime_command(cdi: bool) -> str:
    """nvidia-ctk adds its runtime to /etc/docker/daemon.json and keeps every other setting."""
    return "nvidia-ctk runtime configure --runtime=docker" + (" --cdi.enabled" if cdi else "")


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.vllm_runtime != "image":
        return {}
    paths = [*apt_repository_question("docker"), *apt_repository_question("nvidia-container-toolkit")]
    return {
        "gpu": gpu_question(cfg),
        "containers": containers_question(cfg),
        "debs": Question(DebPackageStates, {}),
        "managed": Question(ManagedPaths, {"paths": paths, "units": [DOCKER_UNIT]}),
    }


@deploy("NVIDIA container toolkit")
@documented(SETTINGS)
def container_toolkit(driver: DriverState = DriverState(ready=False)):
    """
    Install Docker and the NVIDIA Container Toolkit at pinned versions from ``signed-by``
    repositories, register the nvidia runtime in ``daemon.json`` (merged, never overwritten) and,
    once the driver runs, write the CDI spec of the GPUs. Applies when ``vllm_runtime`` is
    ``image``. A converged host changes nothing and Docker is not restarted.

    + driver: the driver role's :class:`DriverState`: the CDI spec needs a running driver, and
      is written again when the driver changed

    Returns the operations whose change means containers using the GPUs must restart.
    """
    cfg = host_config(host)
    if cfg.vllm_runtime != "image":
        return []
    answers = ask_together(host, questions(cfg))
    gpu, state, debs, managed = answers["gpu"], answers["containers"], answers["debs"], answers["managed"]
    cdi = cfg.container_gpu_access == "cdi"

    repositories = [
        (
            "nvidia-container-toolkit",
            "NVIDIA container toolkit repository",
            cfg.nvidia_container_toolkit_repo_url.format(arch=gpu["arch"]),
            "/",
            [],
            cfg.nvidia_container_toolkit_key_url.format(arch=gpu["arch"]),
            cfg.nvidia_container_toolkit_key_sha256,
        )
    ]
    if cfg.docker_source == "docker-repo":
        repositories.insert(
            0,
            (
                "docker",
                "Docker repository",
                cfg.docker_repo_url.format(distro=gpu["distro"]),
                gpu["codename"],
                ["stable"],
                cfg.docker_repo_key_url.format(distro=gpu["distro"]),
                cfg.docker_repo_key_sha256,
            ),
        )
    for repo, name, url, suite, components, key_url, key_sha256 in repositories:
        if repository_due(managed, repo, url, suite, components, key_sha256):
            apt_repository(
                name=name,
                repo=repo,
                url=url,
                suite=suite,
                components=components,
                key_url=key_url,
                key_sha256=key_sha256,
            )
    docker_packages = DOCKER_PACKAGES[cfg.docker_source]
    packages = {name: cfg.docker_version for name in docker_packages if name != "containerd.io"}
    packages.update({"containerd.io": None} if "containerd.io" in docker_packages else {})
    packages.update({name: cfg.nvidia_container_toolkit_version for name in TOOLKIT_PACKAGES})
    installing = bool(packages_due(debs, packages))
    installed = (
        apt_install(name=f"Docker and NVIDIA container toolkit: {', '.join(packages)}", packages=packages)
        if installing
        else None
    )
    # Held: an upgrade of either restarts dockerd, which stops every container.
    if installing or unheld(debs, list(packages)):
        apt_hold(name="Docker and toolkit packages held", patterns=list(packages), pending=installing)

    if state["daemon_json"] == "invalid":
        stop_host(
            name=f"stop: {DOCKER_DAEMON_JSON} is not JSON",
            reason=f"{DOCKER_DAEMON_JSON} is not valid JSON; fix it (dockerd would not start) and run again",
        )
        return []
    docker = unit_enabled(managed, DOCKER_UNIT, name="docker running and enabled", running=True)
    changes = planned(installed)
    if not runtime_configured(state["daemon_json"], cdi):
        configured = server.shell(
            name="nvidia runtime added to /etc/docker/daemon.json", commands=[configure_runtime_command(cdi)]
        )
        # A restart, not systemd.service(restarted=True): planned before Docker is even installed, that
        # would see no running dockerd and only start it, leaving the new runtime unread.
        changes.append(
            server.shell(
                name="restart docker for the nvidia runtime",
                commands=[f"systemctl restart {DOCKER_UNIT}"],
                _if=configured.did_change,
            )
        )
    if driver.ready and (not state["cdi_spec"] or driver.changes):
        changes.append(
            server.shell(
                name=f"CDI spec of the GPUs in {CDI_SPEC}",
                commands=[f"nvidia-ctk cdi generate --output={quote(CDI_SPEC)}"],
                _if=lambda: not state["cdi_spec"] or any(op.did_change() for op in driver.changes),
            )
        )
    return planned(docker, *changes)

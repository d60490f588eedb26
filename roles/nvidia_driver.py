"""nvidia_driver: the NVIDIA driver the host needs, held with its kernel, with persistenced and,
on NVSwitch machines, Fabric Manager at exactly the driver's version."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import server, systemd

from glmfleet import checks
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask, ask_together
from glmfleet.facts.gpu import DriverBranchesOffered, GpuHost
from glmfleet.facts.packages import DebPackageStates
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import NOUVEAU_BLACKLIST, PERSISTENCED_DROPIN
from glmfleet.layout import NVIDIA_HOLD_CONF as UNATTENDED_CONF
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
    upload,
)

CUDA_REPO = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}/{arch}"

# Three digits; ``--data nvidia_driver_branch=580`` arrives as an int, which is fine too.
branch = checks.Check(
    lambda v: type(v) in (str, int) and re.fullmatch(r"[0-9]{3}", str(v)) is not None, "a branch such as '580'"
)
driver_version = checks.matches(r"[0-9]{3}\.[0-9]+(\.[0-9]+)?", "a version such as '580.95.05'")

SETTINGS = (
    Setting(
        "nvidia_driver_source",
        "distro",
        "where the driver comes from: the distro's archive (Ubuntu: Canonical-signed modules; Debian: non-free, "
        "DKMS), NVIDIA's CUDA apt repository (DKMS), or none (the host's driver is managed elsewhere)",
        checks.one_of("distro", "cuda-repo", "none"),
    ),
    Setting(
        "nvidia_driver_branch",
        None,
        "driver branch (default: per distro and source, the newest production branch "
        "its repositories offer: Debian 12's archive 535; Ubuntu's and NVIDIA's repository 580); a branch the host's "
        "repositories do not offer stops that host before anything changes, naming those they offer",
        checks.optional(branch),
    ),
    Setting(
        "nvidia_driver_version",
        None,
        "exact driver version within the branch, e.g. '580.95.05' (default: the "
        "newest of the branch at install time, then held)",
        checks.optional(driver_version),
    ),
    Setting(
        "nvidia_driver_open",
        None,
        "use the open kernel modules (default: only where the GPUs require them, Blackwell and later)",
        checks.optional(checks.boolean),
    ),
    Setting(
        "nvidia_fabric_manager",
        None,
        "install and run Fabric Manager (default: when the host has NVSwitches, as 8-GPU SXM machines do)",
        checks.optional(checks.boolean),
    ),
    Setting(
        "nvidia_allow_reboot",
        False,
        "reboot the host when its driver changed, then check nvidia-smi sees every "
        "GPU; otherwise the run reports 'reboot required' and skips what needs the GPU",
        checks.boolean,
    ),
    Setting(
        "nvidia_reboot_timeout",
        900,
        "seconds a rebooting host may take to come back (big servers POST slowly)",
        checks.int_in(60, 7200),
    ),
    Setting(
        "nvidia_cuda_repo_url",
        CUDA_REPO,
        "NVIDIA's CUDA apt repository (or a mirror); {distro} becomes "
        "ubuntu2204, ubuntu2404 or debian12 and {arch} x86_64 or sbsa",
        checks.url_template("distro", "arch"),
    ),
    Setting(
        "nvidia_cuda_repo_key_url",
        CUDA_REPO + "/3bf863cc.pub",
        "the CUDA repository's signing key (same placeholders)",
        checks.url_template("distro", "arch"),
    ),
    Setting(
        "nvidia_cuda_repo_key_sha256",
        None,
        "sha256 of that key file; when set, another key is refused",
        checks.optional(checks.sha256),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    found = []
    version, branch = cfg["nvidia_driver_version"], cfg["nvidia_driver_branch"]
    if version and branch is not None and not version.startswith(f"{branch}."):
        found.append(
            f"nvidia_driver_version = {version!r} is not in nvidia_driver_branch = {branch!r}; "
            f"set nvidia_driver_branch to {version.split('.')[0]!r}"
        )
    return found


# What glmfleet holds: driver and kernel packages move together or not at all.
HOLD_PATTERNS = [
    "*nvidia*",
    "libcuda*",
    "libnvcuvid*",
    "cuda-drivers*",
    "linux-image-*",
    "linux-headers-*",
    "linux-modules-*",
    "linux-objects-*",
    "linux-signatures-*",
    "linux-generic*",
]
# The same, as the regular expressions unattended-upgrades' Package-Blacklist takes.
UNATTENDED_BLACKLIST = [
    "nvidia-",
    "libnvidia-",
    "libcuda",
    "libnvcuvid",
    "cuda-drivers",
    "firmware-nvidia",
    "xserver-xorg-video-nvidia",
    "linux-image-",
    "linux-headers-",
    "linux-modules-",
    "linux-objects-",
    "linux-signatures-",
    "linux-generic",
]
DISTRO_REPOS = {("ubuntu", "22.04"): "ubuntu2204", ("ubuntu", "24.04"): "ubuntu2404", ("debian", "12"): "debian12"}
CUDA_ARCH = {"amd64": "x86_64", "arm64": "sbsa"}


@dataclass
class DriverPlan:
    """What the host gets: packages (name to apt version glob, None for any version), the
    Fabric Manager package the driver's source provides (None: not packaged), and whether
    the kernel module is built on the host by DKMS (unsigned: a Secure Boot problem)."""

    packages: dict[str, str | None]
    fabric_manager: str | None
    dkms: bool
    headers: list[str] = field(default_factory=list)


@dataclass
class DriverState:
    """What the driver role leaves behind, for the roles after it.

    ready: the wanted driver runs and sees the GPUs, so steps that need the GPU can run.
    changes: operations whose change means GPU users must restart (the driver or its reboot).
    """

    ready: bool
    changes: list = field(default_factory=list)


# The branch glmfleet installs where nvidia_driver_branch is not set: the newest production
# branch each source offers (Debian 12's non-free archive carries 535 alone).
DEFAULT_BRANCH = "580"
DEFAULT_BRANCH_BY_DISTRO = {("distro", "debian", "12"): "535"}


def wanted_branch(cfg: HostConfig, gpu: dict) -> str:
    if cfg.nvidia_driver_branch is not None:
        return str(cfg.nvidia_driver_branch)
    if cfg.nvidia_driver_version:
        return cfg.nvidia_driver_version.split(".")[0]
    return DEFAULT_BRANCH_BY_DISTRO.get(
        (cfg.nvidia_driver_source, gpu["distro"], gpu["distro_version"]), DEFAULT_BRANCH
    )


def version_glob(cfg: HostConfig, gpu: dict) -> str:
    """The apt version pattern of the wanted driver: one release, or any of the branch."""
    if cfg.nvidia_driver_version:
        return f"{cfg.nvidia_driver_version}-*"
    return f"{wanted_branch(cfg, gpu)}.*"


def wants_open(cfg: HostConfig, gpu: dict) -> bool:
    return gpu["open_modules_required"] if cfg.nvidia_driver_open is None else cfg.nvidia_driver_open


def wants_fabric_manager(cfg: HostConfig, gpu: dict) -> bool:
    return gpu["nvswitches"] > 0 if cfg.nvidia_fabric_manager is None else cfg.nvidia_fabric_manager


def driver_plan(cfg: HostConfig, gpu: dict) -> DriverPlan:
    """The packages for the host's distro, the driver source and the module flavour."""
    branch, glob, kernel = wanted_branch(cfg, gpu), version_glob(cfg, gpu), gpu["kernel"]
    headers = [f"linux-headers-{kernel}"] if gpu["kernel_headers_candidate"] else []
    if cfg.nvidia_driver_source == "distro" and gpu["distro"] == "ubuntu":
        # Canonical's precompiled modules are signed for Secure Boot and need neither DKMS nor
        # headers; the headless set leaves out X.
        flavour = f"{branch}-server" + ("-open" if wants_open(cfg, gpu) else "")
        return DriverPlan(
            packages={
                f"nvidia-headless-no-dkms-{flavour}": glob,
                f"nvidia-utils-{branch}-server": glob,  # nvidia-smi; one package for both module flavours
                f"linux-modules-nvidia-{flavour}-{kernel}": None,
            },
            fabric_manager=f"nvidia-fabricmanager-{branch}",
            dkms=False,
        )
    if cfg.nvidia_driver_source == "distro":
        # Debian's non-free driver; persistenced is versioned on its own.
        module = "nvidia-open-kernel-dkms" if wants_open(cfg, gpu) else "nvidia-kernel-dkms"
        return DriverPlan(
            packages={"nvidia-driver": glob, module: glob, "nvidia-smi": glob, "nvidia-persistenced": None},
            fabric_manager=None,
            dkms=True,
            headers=headers,
        )
    # NVIDIA's CUDA repository: the branch metapackages of its installation guide.
    meta = f"nvidia-open-{branch}" if wants_open(cfg, gpu) else f"cuda-drivers-{branch}"
    return DriverPlan(
        packages={meta: glob}, fabric_manager=f"nvidia-fabricmanager-{branch}", dkms=True, headers=headers
    )


def running_driver_is_wanted(cfg: HostConfig, gpu: dict) -> bool:
    module = gpu["module"]
    if module is None or module["open"] != wants_open(cfg, gpu):
        return False
    if cfg.nvidia_driver_version:
        return module["version"] == cfg.nvidia_driver_version
    return module["version"].startswith(f"{wanted_branch(cfg, gpu)}.")


def cuda_repo_url(template: str, gpu: dict) -> str:
    return template.format(
        distro=DISTRO_REPOS.get((gpu["distro"], gpu["distro_version"]), "unsupported"),
        arch=CUDA_ARCH.get(gpu["arch"], gpu["arch"]),
    )


def host_problems(cfg: HostConfig, gpu: dict, plan: DriverPlan, installing: bool) -> list[str]:
    """Why this host cannot get the wanted driver, each with the fix; empty when it can."""
    found = []
    if (gpu["distro"], gpu["distro_version"]) not in DISTRO_REPOS:
        found.append(
            f"{gpu['distro']} {gpu['distro_version']} is not supported: glmfleet installs the driver on "
            "Ubuntu 22.04/24.04 and Debian 12; set nvidia_driver_source: none to manage it yourself"
        )
    if gpu["open_modules_required"] and cfg.nvidia_driver_open is False:
        found.append(
            "this host's GPUs (Blackwell or later) work only with the open kernel modules; "
            "set nvidia_driver_open: true or leave it unset"
        )
    if wants_fabric_manager(cfg, gpu) and plan.fabric_manager is None:
        found.append(
            f"{gpu['nvswitches']} NVSwitch(es) need Fabric Manager, which Debian's archive does not "
            "package; set nvidia_driver_source: cuda-repo"
        )
    if installing and plan.dkms and gpu["secure_boot"] and not gpu["signing_key_enrolled"]:
        found.append(
            f"Secure Boot is on and nvidia_driver_source: {cfg.nvidia_driver_source} builds the kernel module with "
            "DKMS, unsigned by any key this machine trusts, so the module would never load. Fix one of: "
            "turn Secure Boot off in the firmware; on Ubuntu use nvidia_driver_source: distro (modules signed by "
            "Canonical); or enroll the DKMS signing key: `dkms generate_mok` (Debian) or "
            "`update-secureboot-policy --new-key` (Ubuntu), `mokutil --import` the key it prints, reboot and "
            "confirm the enrollment on the console, then run the deploy again"
        )
    return found


def driver_problems(cfg: HostConfig, gpu: dict) -> list[str]:
    """Why this host cannot get the wanted driver (preflight stops the host with them before
    anything changes): ``host_problems``, and a branch its distribution does not offer."""
    running = running_driver_is_wanted(cfg, gpu)
    problems = host_problems(cfg, gpu, driver_plan(cfg, gpu), installing=not running)
    if not running and cfg.nvidia_driver_source == "distro":
        # Asked only where a driver is to be installed: a converged host makes no extra round trip.
        offered = ask(host, DriverBranchesOffered)
        if offered and wanted_branch(cfg, gpu) not in offered:
            problems.append(
                f"nvidia_driver_branch {wanted_branch(cfg, gpu)} is not offered by this host's repositories "
                f"({gpu['distro']} {gpu['distro_version']} offers {', '.join(offered)}): set nvidia_driver_branch "
                "to one of them, or nvidia_driver_source: cuda-repo for NVIDIA's branches"
            )
    return problems


def reboot_reason(cfg: HostConfig, gpu: dict, installing: bool) -> str:
    running = gpu["module"]["version"] if gpu["module"] else "none"
    gpus = f"{len(gpu['gpus'])} GPU(s)" if gpu["gpus"] else "no NVIDIA GPU found on the PCI bus"
    wanted = cfg.nvidia_driver_version or f"branch {wanted_branch(cfg, gpu)}"
    return f"reboot required: driver {wanted} {'being installed' if installing else 'installed'}, running: {running} ({gpus})"


def gpu_count_check(expected: int) -> str:
    """After the reboot: nvidia-smi must list every GPU the PCI bus has."""
    return (
        "seen=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l); "
        f'[ "$seen" -eq {expected} ] || {{ echo "nvidia-smi sees $seen of {expected} GPUs after the reboot; '
        'kernel log:" >&2; dmesg 2>/dev/null | grep -i -E "nvrm|nvidia" | tail -n 20 >&2; exit 1; }'
    )


def fabric_manager_matches_driver(plan: DriverPlan) -> str:
    """Fabric Manager refuses to start at any other version than the driver's."""
    main = next(iter(plan.packages))
    version = "$(dpkg-query -W -f='${Version}' %s | cut -d- -f1)"
    return (
        f'fm={version % plan.fabric_manager}; driver={version % main}; [ "$fm" = "$driver" ] || '
        f'{{ echo "{plan.fabric_manager} $fm differs from driver $driver: set nvidia_driver_version" >&2; exit 1; }}'
    )


def gpu_question(cfg: HostConfig) -> Question:
    """The GpuHost fact, asked the same way by every role that reads it (so once per host): the
    kernel headers' candidate version only where this role may install a driver."""
    return Question(GpuHost, {"headers_candidate": cfg.nvidia_driver_source != "none"})


PERSISTENCED = "nvidia-persistenced.service"
FABRIC_MANAGER = "nvidia-fabricmanager.service"
NOUVEAU_BLACKLIST_TEXT = (
    "# Managed by glmfleet: the NVIDIA driver cannot load while nouveau holds the GPUs.\n"
    "blacklist nouveau\noptions nouveau modeset=0\n"
)
UNATTENDED_TEXT = (
    "// Managed by glmfleet: the NVIDIA driver and the kernel change only together, in a deploy.\n"
    "Unattended-Upgrade::Package-Blacklist {\n"
    + "".join(f'    "{pattern}";\n' for pattern in UNATTENDED_BLACKLIST)
    + "};\n"
)
PERSISTENCED_DROPIN_TEXT = (
    "# Managed by glmfleet: persistence mode on, so the GPUs stay initialised.\n[Service]\n"
    "ExecStart=\nExecStart=/usr/bin/nvidia-persistenced --user nvidia-persistenced --verbose\n"
)


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.nvidia_driver_source == "none":
        return {}
    paths = [NOUVEAU_BLACKLIST, UNATTENDED_CONF, PERSISTENCED_DROPIN, *apt_repository_question("cuda")]
    return {
        "gpu": gpu_question(cfg),
        "debs": Question(DebPackageStates, {}),
        "managed": Question(ManagedPaths, {"paths": paths, "units": [PERSISTENCED, FABRIC_MANAGER]}),
    }


@deploy("NVIDIA driver")
@documented(SETTINGS)
def nvidia_driver() -> DriverState:
    """
    Install the wanted NVIDIA driver unless it already runs, and keep it running across upgrades.

    The driver comes from the distro or NVIDIA's CUDA repository (``signed-by`` keyring), at a
    branch or an exact version; its packages and the kernel's are held (``apt-mark hold`` and an
    unattended-upgrades blacklist), nouveau is blacklisted (initramfs rebuilt when that changed),
    nvidia-persistenced keeps the GPUs initialised and, with NVSwitches, Fabric Manager runs at
    the driver's exact version. A host that cannot load the driver (Secure Boot with an unsigned
    module, Blackwell without open modules) stops with the reason and the fix. Each step is
    planned only where the host's answers show it undone: a converged host plans no operation.

    A changed driver needs a reboot: with ``nvidia_allow_reboot`` the host reboots, comes back
    and must show every GPU in ``nvidia-smi``; otherwise the run reports "reboot required".
    Returns a :class:`DriverState`.
    """
    cfg = host_config(host)
    if cfg.nvidia_driver_source == "none":
        return DriverState(ready=True)
    answers = ask_together(host, questions(cfg))
    gpu, debs, managed = answers["gpu"], answers["debs"], answers["managed"]
    plan = driver_plan(cfg, gpu)
    running = running_driver_is_wanted(cfg, gpu)
    fabric_manager = wants_fabric_manager(cfg, gpu)
    problems = driver_problems(cfg, gpu)
    if problems:
        stop_host(name="stop: this host cannot run the wanted NVIDIA driver", reason="; ".join(problems))
        return DriverState(ready=False)

    packages = {} if running else {**{name: None for name in plan.headers}, **plan.packages}
    if fabric_manager:
        packages[plan.fabric_manager] = f"{gpu['module']['version']}-*" if running else version_glob(cfg, gpu)
    if cfg.nvidia_driver_source == "cuda-repo":
        url, key_url = cuda_repo_url(cfg.nvidia_cuda_repo_url, gpu), cuda_repo_url(cfg.nvidia_cuda_repo_key_url, gpu)
        if repository_due(managed, "cuda", url, "/", [], cfg.nvidia_cuda_repo_key_sha256):
            apt_repository(
                name="NVIDIA CUDA repository",
                repo="cuda",
                url=url,
                suite="/",
                components=[],
                key_url=key_url,
                key_sha256=cfg.nvidia_cuda_repo_key_sha256,
            )
    if not running and plan.dkms and not gpu["kernel_headers"] and not plan.headers:
        report(f"no headers package for the running kernel {gpu['kernel']}: DKMS cannot build the module for it")
    if packages_due(debs, {"pciutils": None}):
        apt_install(name="PCI tools (GPU and NVSwitch names)", packages={"pciutils": None})
    if upload(managed, NOUVEAU_BLACKLIST, NOUVEAU_BLACKLIST_TEXT, name="nouveau blacklisted"):
        server.shell(
            name="initramfs rebuilt without nouveau",
            commands=["if command -v update-initramfs >/dev/null; then update-initramfs -u -k all; fi"],
        )
    installing = bool(packages_due(debs, packages))
    installed = apt_install(name=f"NVIDIA packages: {', '.join(packages)}", packages=packages) if installing else None
    driver_changes = installing and not running
    if fabric_manager and driver_changes:
        server.shell(name="Fabric Manager at the driver's version", commands=[fabric_manager_matches_driver(plan)])
    upload(managed, UNATTENDED_CONF, UNATTENDED_TEXT, name="unattended-upgrades leaves driver and kernel alone")
    if installing or unheld(debs, HOLD_PATTERNS):
        apt_hold(name="driver and kernel packages held", patterns=HOLD_PATTERNS, pending=installing)
    services = persistence_daemon(cfg, gpu, managed, start=running)
    if fabric_manager:
        services.append(unit_enabled(managed, FABRIC_MANAGER, name="Fabric Manager enabled", running=running))
    if running:
        return DriverState(ready=True, changes=planned(installed, *services))

    # The wanted driver is not loaded: only a reboot loads it (and unloads nouveau).
    if not (cfg.nvidia_allow_reboot and (driver_changes or gpu["gpus"])):
        report(reboot_reason(cfg, gpu, driver_changes))
        return DriverState(ready=False)
    rebooted = server.reboot(
        name="reboot into the new driver", delay=10, interval=5, reboot_timeout=cfg.nvidia_reboot_timeout
    )
    if not gpu["gpus"]:
        report("rebooted; no NVIDIA GPU on the PCI bus, so nothing for the driver to drive")
        return DriverState(ready=False, changes=planned(installed, rebooted))
    server.shell(name=f"nvidia-smi sees all {len(gpu['gpus'])} GPUs", commands=[gpu_count_check(len(gpu["gpus"]))])
    return DriverState(ready=True, changes=planned(installed, rebooted))


def report(message: str) -> None:
    """Say something about this host in the run's output, planning nothing."""
    logger.warning(f"{host.name}: {message}")


def persistence_daemon(cfg: HostConfig, gpu: dict, managed: dict, start: bool) -> list:
    """nvidia-persistenced enabled (started when the driver runs) with persistence mode on:
    Ubuntu's and NVIDIA's units start it with ``--no-persistence-mode`` (as the
    ``nvidia-persistenced`` user their packages create), Debian's does not.
    Returns the operations that (re)start it."""
    changes = []
    if not (cfg.nvidia_driver_source == "distro" and gpu["distro"] == "debian"):
        dropin = upload(
            managed, PERSISTENCED_DROPIN, PERSISTENCED_DROPIN_TEXT, name="nvidia-persistenced keeps persistence mode on"
        )
        if dropin:
            systemd.daemon_reload(name="systemd daemon-reload for nvidia-persistenced")
            if start:
                changes.append(
                    server.shell(name="restart nvidia-persistenced", commands=[f"systemctl restart {PERSISTENCED}"])
                )
    changes.append(unit_enabled(managed, PERSISTENCED, name="nvidia-persistenced enabled", running=start))
    return planned(*changes)

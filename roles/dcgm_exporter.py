"""dcgm_exporter: GPU telemetry for Prometheus (temperature, power, memory, utilisation, Xid
errors), from NVIDIA's DCGM and dcgm-exporter packages in the CUDA repository, on the GPU hosts
of a monitored fleet.

DCGM and its exporter are released in pairs (the exporter's tag is ``<dcgm>-<exporter>``) and
run only as a pair: both are pinned by one setting, installed together and held. The exporter
asks the host engine that ``nvidia-dcgm`` runs (not a second one of its own) for glmfleet's own
list of fields (``files/dcgm-counters.csv``), so the metric names stay put across releases.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import systemd

from glmfleet import FILES, checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts
from glmfleet.facts.packages import DebPackageStates
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    CUDA_DRIVER_PIN,
    DCGM_COUNTERS,
    DCGM_EXPORTER,
    DCGM_EXPORTER_DROPIN,
    DCGM_EXPORTER_UNIT,
    DCGM_UNIT,
    GPUS_EXPECTED,
)
from glmfleet.operations import (
    apt_hold,
    apt_install,
    apt_repository,
    apt_repository_question,
    packages_due,
    planned,
    port_taken,
    repository_due,
    service_running,
    unheld,
    unit_enabled,
    upload,
)
from roles.nvidia_driver import cuda_repo_url, gpu_question

COUNTERS = FILES / "dcgm-counters.csv"
HOST_ENGINE = "localhost:5555"  # where nvidia-dcgm's nv-hostengine listens by default
HOLD = ["datacenter-gpu-manager-*"]
# Driver packages of the CUDA repository: kept away from a host whose driver comes from the distribution.
DRIVER_PACKAGES = "*nvidia* libcuda* libnvcuvid* cuda-drivers*"

release = checks.matches(
    r"[0-9]+(\.[0-9]+)+-[0-9]+(\.[0-9]+)+",
    "a paired release such as '4.6.0-4.8.3' (DCGM's version, then the exporter's)",
)

SETTINGS = (
    Setting(
        "dcgm_exporter",
        None,
        "run DCGM and dcgm-exporter on this host when the fleet is monitored (default: where glmfleet manages the "
        "NVIDIA driver, nvidia_driver_source other than 'none')",
        checks.optional(checks.boolean),
    ),
    Setting(
        "dcgm_exporter_release",
        "4.6.0-4.8.3",
        "the DCGM and dcgm-exporter versions, paired as NVIDIA tags the exporter's releases (DCGM 4.6.0 with "
        "exporter 4.8.3); both come from the CUDA repository (nvidia_cuda_repo_url) and are held",
        release,
    ),
    Setting(
        "dcgm_exporter_listen_address",
        "0.0.0.0",
        "address dcgm-exporter listens on (Prometheus on the monitoring hosts must reach it)",
        checks.listen_address,
    ),
    Setting("dcgm_exporter_port", 9400, "TCP port dcgm-exporter listens on", checks.int_in(1, 65535)),
)


def enabled(cfg: HostConfig | dict) -> bool:
    """Whether this host runs DCGM when its fleet is monitored (it is then a scrape target)."""
    if cfg["dcgm_exporter"] is not None:
        return cfg["dcgm_exporter"]
    return cfg["nvidia_driver_source"] != "none"


def packages(cfg: HostConfig, cuda_version: str) -> dict[str, str]:
    """DCGM's core, its build for the driver's CUDA major version, and the exporter, at the pair."""
    dcgm, exporter = cfg.dcgm_exporter_release.split("-", 1)
    cuda = cuda_version.split(".")[0]
    return {
        "datacenter-gpu-manager-4-core": f"1:{dcgm}-*",
        f"datacenter-gpu-manager-4-cuda{cuda}": f"1:{dcgm}-*",
        "datacenter-gpu-manager-exporter": f"{exporter}-*",
    }


def render_dropin(cfg: HostConfig) -> str:
    argv = [
        DCGM_EXPORTER,
        "--remote-hostengine-info",
        HOST_ENGINE,
        "--collectors",
        DCGM_COUNTERS,
        "--address",
        filesyntax.host_port(cfg.dcgm_exporter_listen_address, cfg.dcgm_exporter_port),
    ]
    return (
        "# Managed by glmfleet: the host engine nvidia-dcgm runs, glmfleet's fields, the configured address,\n"
        "# and the output in the journal (the package appends it to a file of its own).\n"
        "[Service]\nExecStart=\n"
        f"ExecStart={filesyntax.systemd_command_line(argv)}\n"
        "StandardOutput=journal\nStandardError=journal\n"
    )


def render_pin(repo_url: str) -> str:
    """apt preferences that refuse the CUDA repository's driver packages (the first matching
    record with a package list decides: apt_preferences(5)); DCGM comes from there all the same."""
    origin = urlsplit(repo_url).hostname or ""  # a file: repository's origin is ""
    return (
        "# Managed by glmfleet: the CUDA repository is here for DCGM; this host's NVIDIA driver comes from the\n"
        "# distribution (nvidia_driver_source), so the repository's driver packages are never candidates.\n"
        f"Package: {DRIVER_PACKAGES}\nPin: origin {filesyntax.apt_preferences_string(origin)}\nPin-Priority: -1\n"
    )


def render_gpus_expected(count: int) -> str:
    return (
        "# HELP glmfleet_gpus_expected NVIDIA GPUs on this host's PCI bus when glmfleet last deployed it.\n"
        "# TYPE glmfleet_gpus_expected gauge\n"
        f"glmfleet_gpus_expected {count}\n"
    )


def questions(cfg: HostConfig) -> dict[str, Question]:
    if not enabled(cfg):
        return {}
    paths = [DCGM_EXPORTER, DCGM_COUNTERS, DCGM_EXPORTER_DROPIN, CUDA_DRIVER_PIN, GPUS_EXPECTED]
    return {
        "gpu": gpu_question(cfg),
        "debs": Question(DebPackageStates, {}),
        "managed": Question(
            ManagedPaths,
            {"paths": [*paths, *apt_repository_question("cuda")], "units": [DCGM_UNIT, DCGM_EXPORTER_UNIT]},
        ),
        "listeners": Question(ListeningPorts, {"port": cfg.dcgm_exporter_port}),
    }


@deploy("DCGM exporter")
@documented(SETTINGS)
def dcgm_exporter():
    """
    Install DCGM and dcgm-exporter at the pinned pair from the CUDA repository, hold them, and
    run the exporter on the host engine of ``nvidia-dcgm`` with glmfleet's fields.

    Where the driver comes from the distribution, an apt preference keeps the CUDA repository's
    driver packages out. The number of GPUs on the PCI bus is left for the node exporter
    (``glmfleet_gpus_expected``), so that an alert tells when DCGM sees fewer. Waits for a
    driver that runs (its CUDA version picks DCGM's build); a converged host plans nothing.
    """
    cfg = host_config(host)
    if not enabled(cfg):
        return
    answers = ask_together(host, questions(cfg))
    gpu, debs, managed = answers["gpu"], answers["debs"], answers["managed"]
    if not gpu["cuda_version"]:
        logger.warning(f"{host.name}: DCGM waits for a running NVIDIA driver (its CUDA version picks DCGM's build)")
        return
    if port_taken(answers["listeners"], cfg.dcgm_exporter_port, "dcgm_exporter_port", DCGM_EXPORTER_UNIT):
        return
    url = cuda_repo_url(cfg.nvidia_cuda_repo_url, gpu)
    # The driver role adds the same repository where the driver comes from it.
    if cfg.nvidia_driver_source != "cuda-repo" and repository_due(
        managed, "cuda", url, "/", [], cfg.nvidia_cuda_repo_key_sha256
    ):
        apt_repository(
            name="NVIDIA CUDA repository (DCGM)",
            repo="cuda",
            url=url,
            suite="/",
            components=[],
            key_url=cuda_repo_url(cfg.nvidia_cuda_repo_key_url, gpu),
            key_sha256=cfg.nvidia_cuda_repo_key_sha256,
        )
    if cfg.nvidia_driver_source == "distro":
        upload(managed, CUDA_DRIVER_PIN, render_pin(url), name="the CUDA repository offers no driver here")
    wanted = packages(cfg, gpu["cuda_version"])
    installing = bool(packages_due(debs, wanted))
    installed = (
        apt_install(name=f"DCGM {cfg.dcgm_exporter_release}: {', '.join(wanted)}", packages=wanted)
        if installing
        else None
    )
    if installing or unheld(debs, HOLD):
        apt_hold(name="DCGM packages held (upgraded in pairs, by a deploy)", patterns=HOLD, pending=installing)
    unit_enabled(managed, DCGM_UNIT, name="DCGM host engine running", running=True)
    counters = upload(managed, DCGM_COUNTERS, COUNTERS, name=f"DCGM fields {DCGM_COUNTERS}")
    dropin = upload(
        managed, DCGM_EXPORTER_DROPIN, render_dropin(cfg), name=f"dcgm-exporter unit {DCGM_EXPORTER_DROPIN}"
    )
    if dropin:
        systemd.daemon_reload(name="systemd daemon-reload for dcgm-exporter")
    upload(managed, GPUS_EXPECTED, render_gpus_expected(len(gpu["gpus"])), name="GPUs expected", atomic=True)
    service_running(
        managed,
        DCGM_EXPORTER_UNIT,
        planned(installed, counters, dropin),
        cfg.dcgm_exporter_port,
        cfg.verify_journal_lines,
        "dcgm-exporter",
        (DCGM_COUNTERS, DCGM_EXPORTER_DROPIN),
    )

"""What the GPU stack roles tell hosts the local fleet cannot be (Ubuntu, H100/HGX, Secure Boot,
NVIDIA's and Docker's repositories): the real roles plan against pyinfra's @fake connector,
whose hosts answer each fact's command with the output given here (tests/planning.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

from roles.container_toolkit import container_toolkit
from roles.nvidia_driver import DriverState, nvidia_driver
from roles.vllm_image import vllm_image
from tests.support.imagearchive import write_image_archive
from tests.support.paths import FIXTURES
from tests.support.planning import B200, H100, NVSWITCH, gpu_host, installed, plan


def commands(ops, name_part: str) -> list[str]:
    found = [op for op in ops if name_part in op.name]
    assert found, f"no operation named like {name_part!r} in {[op.name for op in ops]}"
    return [command for op in found for command in op.commands]


def names(ops) -> str:
    return "\n".join(op.name for op in ops)


def test_ubuntu_distro_driver_uses_signed_precompiled_modules_and_holds_them(caplog):
    ops = plan(nvidia_driver, {"nvidia_driver_branch": "580"}, gpu_host())
    install = commands(ops, "NVIDIA packages")[0]
    assert "'nvidia-headless-no-dkms-580-server=580.*' 'nvidia-utils-580-server=580.*'" in install
    assert "linux-modules-nvidia-580-server-5.15.0-125-generic" in install
    assert "dkms" not in install.replace("no-dkms", "") and "linux-headers" not in install
    assert "apt-key" not in "\n".join(c for op in ops for c in op.commands)
    assert "apt-mark hold" in commands(ops, "packages held")[0]
    # Said in the output, not an operation: a converged host waiting for its reboot plans none.
    assert "reboot required: driver branch 580 being installed, running: none (1 GPU(s))" in caplog.text
    assert "reboot into" not in names(ops)


def test_open_modules_and_exact_version():
    ops = plan(nvidia_driver, {"nvidia_driver_open": True, "nvidia_driver_version": "580.95.05"}, gpu_host())
    install = commands(ops, "NVIDIA packages")[0]
    assert "'nvidia-headless-no-dkms-580-server-open=580.95.05-*'" in install
    assert "linux-modules-nvidia-580-server-open-5.15.0-125-generic" in install


def test_cuda_repo_on_ubuntu_2404_with_a_mirror_and_pinned_key():
    mirror = "http://mirror.example.internal/cuda/{distro}/{arch}"
    sha = "a" * 64
    ops = plan(
        nvidia_driver,
        {
            "nvidia_driver_source": "cuda-repo",
            "nvidia_cuda_repo_url": mirror,
            "nvidia_cuda_repo_key_url": mirror + "/3bf863cc.pub",
            "nvidia_cuda_repo_key_sha256": sha,
        },
        gpu_host(distro="ubuntu|24.04|noble", kernel="6.8.0-45-generic", headers_candidate="6.8.0-45.45"),
    )
    repo = commands(ops, "CUDA repository")
    assert "http://mirror.example.internal/cuda/ubuntu2404/x86_64/3bf863cc.pub" in repo[0]
    assert f"echo '{sha}  /etc/apt/keyrings/glmfleet-cuda.asc.partial' | sha256sum --check" in repo[0]
    install = commands(ops, "NVIDIA packages")[0]
    assert "linux-headers-6.8.0-45-generic 'cuda-drivers-580=580.*'" in install


def test_nvswitch_gets_fabric_manager_at_the_driver_version():
    ops = plan(nvidia_driver, {}, gpu_host(pci=[H100, H100, NVSWITCH]))
    assert "'nvidia-fabricmanager-580=580.*'" in commands(ops, "NVIDIA packages")[0]
    check = commands(ops, "Fabric Manager at the driver's version")[0]
    assert "nvidia-fabricmanager-580" in check and "nvidia-headless-no-dkms-580-server" in check
    assert "systemctl enable nvidia-fabricmanager.service" in commands(ops, "Fabric Manager enabled")


RUNNING_580 = ["NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Release Build  (dvs-builder@U16-T02-35-3)"]


def test_wanted_driver_running_installs_nothing_but_fabric_manager_at_its_version():
    ops = plan(
        nvidia_driver,
        {},
        {**gpu_host(pci=[H100, NVSWITCH], module=RUNNING_580), **installed("nvidia-persistenced 580.95.05-0ubuntu1")},
    )
    install = commands(ops, "NVIDIA packages")
    assert install == [install[0]] and "'nvidia-fabricmanager-580=580.95.05-*'" in install[0]
    assert "headless" not in install[0] and "reboot" not in names(ops)
    assert "systemctl start nvidia-fabricmanager.service" in commands(ops, "Fabric Manager enabled")


def test_reboot_allowed_reboots_and_then_counts_gpus():
    ops = plan(nvidia_driver, {"nvidia_allow_reboot": True}, gpu_host(pci=[H100, H100]))
    assert "( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &" in commands(ops, "reboot into the new driver")
    check = commands(ops, "nvidia-smi sees all 2 GPUs")[0]
    assert '[ "$seen" -eq 2 ]' in check


@pytest.mark.parametrize(
    ("data", "host", "reason"),
    [
        ({"nvidia_driver_source": "cuda-repo"}, gpu_host(secure_boot="SecureBoot enabled"), "Secure Boot is on"),
        ({"nvidia_driver_open": False}, gpu_host(pci=[B200]), "work only with the open kernel modules"),
        (
            {"nvidia_driver_branch": "535"},
            gpu_host(distro="debian|12|bookworm", pci=[H100, NVSWITCH]),
            "archive does not package",
        ),
        ({}, gpu_host(distro="rocky|9.4|"), "is not supported"),
    ],
)
def test_host_that_cannot_run_the_driver_stops_before_any_change(data, host, reason):
    ops = plan(nvidia_driver, data, host)
    assert [op.name for op in ops] == ["NVIDIA driver | stop: this host cannot run the wanted NVIDIA driver"]
    assert reason in ops[0].commands[0] and ops[0].commands[0].endswith(">&2; exit 1")


def test_secure_boot_is_fine_with_signed_modules_or_an_enrolled_key():
    assert "stop:" not in names(plan(nvidia_driver, {}, gpu_host(secure_boot="SecureBoot enabled")))
    enrolled = gpu_host(secure_boot="SecureBoot enabled", signing_keys=["/var/lib/dkms/mok.pub is already enrolled"])
    assert "stop:" not in names(plan(nvidia_driver, {"nvidia_driver_source": "cuda-repo"}, enrolled))


def test_blackwell_gets_open_modules_by_default():
    install = commands(plan(nvidia_driver, {}, gpu_host(pci=[B200])), "NVIDIA packages")[0]
    assert "nvidia-headless-no-dkms-580-server-open" in install


TOOLKIT_DATA = {"vllm_runtime": "image"}
TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)


def toolkit_host(daemon_json: dict | None):
    host = gpu_host(distro="ubuntu|24.04|noble")
    if daemon_json is not None:
        host["::glmfleet:: daemon_json"] = ["::glmfleet:: daemon_json", json.dumps(daemon_json)]
    return host


def test_toolkit_from_signed_repos_pinned_and_runtime_merged_into_daemon_json():
    ops = plan(container_toolkit, TOOLKIT_DATA, toolkit_host({"log-driver": "journald"}))
    docker_repo = commands(ops, "Docker repository")
    assert "https://download.docker.com/linux/ubuntu/gpg" in docker_repo[0]
    toolkit_repo = commands(ops, "toolkit repository")
    assert "https://nvidia.github.io/libnvidia-container/gpgkey" in toolkit_repo[0]
    install = commands(ops, "Docker and NVIDIA container toolkit")[0]
    assert "'docker-ce=5:28.5.1-1~*' 'docker-ce-cli=5:28.5.1-1~*' containerd.io" in install
    for package in TOOLKIT_PACKAGES:
        assert f"{package}=1.17.8-1" in install
    assert commands(ops, "nvidia runtime added") == ["nvidia-ctk runtime configure --runtime=docker --cdi.enabled"]
    assert commands(ops, "restart docker") == ["systemctl restart docker.service"]
    # No driver yet: no CDI spec, which needs the driver.
    assert "CDI spec" not in names(ops)


def test_toolkit_configured_daemon_json_is_left_alone_and_cdi_spec_written_once_driver_runs():
    configured = {"runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}, "features": {"cdi": True}}
    ops = plan(container_toolkit, TOOLKIT_DATA, toolkit_host(configured), driver=DriverState(ready=True))
    assert "nvidia runtime" not in names(ops) and "restart docker" not in names(ops)
    assert commands(ops, "CDI spec") == ["nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"]


def test_toolkit_is_not_installed_for_the_venv_runtime():
    assert plan(container_toolkit, {}, toolkit_host(None)) == []


def image_host(image_id: str | None) -> dict:
    """A host as the image role's facts see it: the image present or not, useradd there."""
    return {
        "::glmfleet:: daemon_json": ["::glmfleet:: image", *([image_id] if image_id else [])],
        "useradd": ["/usr/sbin/useradd"],
    }


def test_image_is_pulled_by_its_recorded_digest_once():
    digest = "sha256:" + "d" * 64
    data = {"vllm_runtime": "image", "vllm_image_digest": digest}
    ops = plan(vllm_image, data, image_host(None))
    assert commands(ops, "pull") == [f"docker pull vllm/vllm-openai@{digest}"]
    assert "pull" not in names(plan(vllm_image, data, image_host("sha256:" + "e" * 64)))


def test_shipped_archive_is_uploaded_and_loaded_only_when_its_image_is_missing(tmp_path):
    archive = tmp_path / "vllm-openai-v0.22.0.tar"
    image_id = write_image_archive(archive, "vllm/vllm-openai:v0.22.0")
    data = {"vllm_runtime": "image", "vllm_image_archive": str(archive)}
    ops = plan(vllm_image, data, image_host(None))
    assert "<FileUploadCommand /var/lib/glmfleet/images/image.tar>" in commands(ops, f"upload {archive}")
    load = commands(ops, "docker load")[0]
    assert load.startswith("docker load --input /var/lib/glmfleet/images/image.tar && rm -f")
    assert load.endswith(f"= {image_id}")
    converged = names(plan(vllm_image, data, image_host(image_id)))
    assert "upload" not in converged and "docker load" not in converged


# `apt-cache madison nvidia-driver | cut -d'|' -f2` on a fleet host (Debian 12 with non-free), 2026-12-07.
DEBIAN_OFFERS = {"apt-cache pkgnames nvidia-headless-no-dkms-": [" 535.309.01-0+deb12u1 ", " 535.261.03-1 "]}


def test_the_default_branch_is_the_one_the_distribution_offers():
    debian = gpu_host(distro="debian|12|bookworm")
    install = commands(plan(nvidia_driver, {}, {**debian, **DEBIAN_OFFERS}), "NVIDIA packages")[0]
    assert "'nvidia-driver=535.*'" in install
    install = commands(plan(nvidia_driver, {}, gpu_host()), "NVIDIA packages")[0]  # Ubuntu 22.04
    assert "'nvidia-headless-no-dkms-580-server=580.*'" in install


def test_a_branch_the_repositories_do_not_offer_stops_the_host_before_anything_changes():
    from roles.preflight import preflight

    debian = {**gpu_host(distro="debian|12|bookworm"), **DEBIAN_OFFERS}
    ops = plan(preflight, {"nvidia_driver_branch": "580"}, debian)
    assert [op.name for op in ops] == ["preflight | preflight: the host cannot serve this configuration"]
    failed = subprocess.run(["sh", "-c", ops[0].commands[0]], capture_output=True, text=True)
    assert failed.returncode == 1
    assert (
        "nvidia_driver_branch 580 is not offered by this host's repositories (debian 12 offers 535): set "
        "nvidia_driver_branch to one of them, or nvidia_driver_source: cuda-repo"
    ) in failed.stderr
    assert [op.name for op in plan(preflight, {}, debian)] == []


def test_a_converged_ubuntu_host_with_its_driver_running_plans_no_operation():
    """Driver loaded at the wanted version, packages installed and held, files and units right:
    the role plans nothing at all (each step checks the batch's answers before it is planned)."""
    import hashlib

    from glmfleet.layout import NOUVEAU_BLACKLIST, NVIDIA_HOLD_CONF, PERSISTENCED_DROPIN
    from roles.nvidia_driver import NOUVEAU_BLACKLIST_TEXT, PERSISTENCED_DROPIN_TEXT, UNATTENDED_TEXT

    # The H100 machine's real /proc/driver/nvidia/version (driver 580.159.04, open modules).
    module = (FIXTURES / "h100" / "proc-driver-nvidia-version.txt").read_text().splitlines()
    host = gpu_host(module=module, pci=[B200])  # open modules, as that driver is
    files = {
        NOUVEAU_BLACKLIST: NOUVEAU_BLACKLIST_TEXT,
        NVIDIA_HOLD_CONF: UNATTENDED_TEXT,
        PERSISTENCED_DROPIN: PERSISTENCED_DROPIN_TEXT,
    }
    managed = [f"path\t{path}\tf|root|root|644\t1733580000.0" for path in files]
    managed += [f"{hashlib.sha256(text.encode()).hexdigest()}  {path}" for path, text in files.items()]
    managed += ["unit\tnvidia-persistenced.service", "SubState=running", "UnitFileState=enabled"]
    host["-maxdepth 0 -printf"] = managed
    host.update(
        installed(
            "pciutils 1:3.7.0-6",
            "nvidia-headless-no-dkms-580-server-open 580.159.04-0ubuntu1",
            "nvidia-utils-580-server 580.159.04-0ubuntu1",
            "linux-image-5.15.0-125-generic 5.15.0-125.135",
            held=True,
        )
    )
    assert plan(nvidia_driver, {"nvidia_driver_branch": "580"}, host) == []

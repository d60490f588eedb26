"""The GPU stack on real Debian 12 hosts of the local fleet (no GPU there): the real non-free
driver from Debian's archive, the CUDA and toolkit repositories as signed apt repositories
served on loopback, a reboot into the new driver, and the image runtime up to `docker load`.

Runs in file order: each test builds on the host state the one before left.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.support.aptrepo import LoopbackServer, Package, SigningKey, publish_flat
from tests.support.fleettools import TEST_DOUBLE, make_bare, pyinfra, write_inventory
from tests.support.fleettools import fleet_host as host_of
from tests.support.imagearchive import write_image_archive

pytestmark = pytest.mark.fleet

# No branch: the default for Debian 12 is the one its archive offers (535); 580 would fail in apt.
DRIVER = {"nvidia_driver_source": "distro"}
DRIVER_PACKAGES = ["nvidia-driver", "nvidia-kernel-dkms", "nvidia-smi", "nvidia-persistenced"]
TOOLKIT_VERSION = "1.17.8-1"
TOOLKIT_PACKAGES = [
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
]
API_KEY = "sk-glmfleet-gpustack-51e0"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """NVIDIA's two repositories as a site's mirror would serve them, on loopback.

    The CUDA repository's branch metapackage is built here and depends on Debian's real driver
    packages, so the install through it is the real one. The toolkit packages are placeholders
    with the real names and the pinned version: no nvidia-ctk binary can be fetched here.
    """
    root = tmp_path_factory.mktemp("repos")
    key = SigningKey(root / "gnupg")
    publish_flat(
        root / "www/cuda/debian12/x86_64",
        [
            Package(
                "cuda-drivers-535",
                "535.0-1glmfleettest",
                [
                    "nvidia-driver (>= 535)",
                    "nvidia-driver (<< 536)",
                    "nvidia-kernel-dkms",
                    "nvidia-smi",
                    "nvidia-persistenced",
                ],
                description="loopback stand-in for the CUDA repository's branch metapackage",
            )
        ],
        key,
    )
    publish_flat(
        root / "www/toolkit/stable/deb/amd64",
        [
            Package(
                name,
                TOOLKIT_VERSION,
                files={f"/usr/share/doc/{name}/GLMFLEET-TEST": "placeholder\n"},
                description="loopback placeholder with the toolkit's name and version",
            )
            for name in TOOLKIT_PACKAGES
        ],
        key,
    )
    with LoopbackServer(root / "www") as server:
        yield {
            "cuda": {
                "nvidia_cuda_repo_url": server.url + "/cuda/{distro}/{arch}",
                "nvidia_cuda_repo_key_url": server.url + "/cuda/{distro}/{arch}/key.asc",
            },
            "toolkit": {
                "nvidia_container_toolkit_repo_url": server.url + "/toolkit/stable/deb/{arch}",
                "nvidia_container_toolkit_key_url": server.url + "/toolkit/stable/deb/{arch}/key.asc",
            },
        }


def run_role(host: str, role: str, data: dict, timeout: int = 900):
    started = time.monotonic()
    run = pyinfra("inventory/local.py", role, "--limit", host, data=data, timeout=timeout)
    run.seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def failed_steps(run, name: str) -> list[str]:
    """The one operation that failed on a run limited to one host: the last it started (pyinfra
    stops a host at its first error, and prints no results once no host is left)."""
    assert run.returncode != 0 and "No hosts remaining" in run.stderr, run.stderr[-4000:]
    return run.started()[-1:]


def held(host) -> set[str]:
    return set(host.check_output("apt-mark showhold").split())


def test_debian_distro_driver_installs_holds_and_reports_reboot_required(fleet):
    name = fleet[0]
    run = run_role(name, "roles.nvidia_driver.nvidia_driver", DRIVER)
    changed = run.changed()[name]
    assert (
        "NVIDIA driver | NVIDIA packages: nvidia-driver, nvidia-kernel-dkms, nvidia-smi, nvidia-persistenced" in changed
    )
    assert "reboot required: driver branch 535 being installed, running: none" in run.stderr + run.stdout
    print(f"driver role on {name}: {run.seconds:.0f} s")

    host = host_of(name)
    for package in DRIVER_PACKAGES:
        assert host.package(package).is_installed
        assert package in held(host)
    assert re.match(r"535\.", host.package("nvidia-driver").version)
    assert host.file("/etc/modprobe.d/glmfleet-blacklist-nouveau.conf").contains("^blacklist nouveau$")
    assert host.file("/etc/apt/apt.conf.d/51glmfleet-nvidia-hold").contains('"nvidia-";')
    assert host.service("nvidia-persistenced").is_enabled
    # Installed, not loaded: the real state before the reboot (no GPU here to load it for).
    assert host.run("nvidia-smi").rc != 0


def test_debian_distro_driver_second_run_plans_no_operation(fleet):
    """Converged: every step of the driver role finds its work done in the one batch of facts and
    plans nothing; what the host waits for (its reboot) is said, not planned."""
    name = fleet[0]
    run = run_role(name, "roles.nvidia_driver.nvidia_driver", DRIVER)
    assert run.planned(name) == [], run.planned(name)
    assert "reboot required: driver branch 535 installed, running: none" in run.stderr + run.stdout


def test_cuda_repo_on_loopback_and_reboot_then_the_deploy_goes_on(fleet, repos, package_index, test_model, tmp_path):
    """The whole deploy on a fresh host: the CUDA repository with its signed-by keyring, the
    driver through its branch metapackage, one reboot, and the roles after it."""
    name = fleet[1]
    make_bare(name)  # other modules' tests may have deployed here before
    host = host_of(name)
    boot_before = host.check_output("cat /proc/sys/kernel/random/boot_id; cut -d' ' -f22 /proc/1/stat")
    data = {
        **TEST_DOUBLE,
        **test_model,
        "pip_index_url": package_index,
        **repos["cuda"],
        "nvidia_driver_source": "cuda-repo",
        "nvidia_driver_branch": "535",
        "nvidia_allow_reboot": True,
        "nvidia_reboot_timeout": 300,
    }
    run = pyinfra("inventory/local.py", "deploy.py", "--limit", name, data=data, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    changed = run.changed()[name]
    assert "NVIDIA driver | reboot into the new driver" in changed
    # The deploy went on after the host came back: the venv role after the driver role ran.
    assert any(op.startswith("vLLM venv | build venv") for op in changed), changed
    host = host_of(name)
    assert host.check_output("cat /proc/sys/kernel/random/boot_id; cut -d' ' -f22 /proc/1/stat") != boot_before

    source = host.file("/etc/apt/sources.list.d/glmfleet-cuda.sources").content_string
    assert "Signed-By: /etc/apt/keyrings/glmfleet-cuda.asc" in source and "/cuda/debian12/x86_64" in source
    assert host.file("/etc/apt/keyrings/glmfleet-cuda.asc").contains("BEGIN PGP PUBLIC KEY BLOCK")
    assert not host.file("/etc/apt/trusted.gpg").exists
    assert host.package("cuda-drivers-535").version == "535.0-1glmfleettest"
    assert {"cuda-drivers-535", "nvidia-driver"} <= held(host)

    again = pyinfra("inventory/local.py", "deploy.py", "--limit", name, data=data, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    # The whole deploy on a converged host with the driver role on: not one operation planned.
    assert again.planned(name) == [], again.planned(name)


IMAGE_TAG = "vllm/vllm-openai:v0.22.0"
# What a test host's dockerd needs to start at all inside systemd-nspawn (facts.md), and a
# user setting that must survive: glmfleet merges into daemon.json, never replaces it.
USER_DAEMON_JSON = {
    "iptables": False,
    "bridge": "none",
    "ip-forward": False,
    "ip-masq": False,
    "log-opts": {"max-size": "10m"},
    # nvidia-ctk's entry, as if configured: the placeholder toolkit has no nvidia-ctk
    "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
}


def test_image_runtime_loads_the_shipped_archive_and_writes_its_unit(fleet, repos, tmp_path):
    name = fleet[0]
    host = host_of(name)
    host.run("mkdir -p /etc/docker")
    host.run(f"echo {json.dumps(json.dumps(USER_DAEMON_JSON))} > /etc/docker/daemon.json")
    archive = tmp_path / "vllm-openai-v0.22.0.tar"
    image_id = write_image_archive(archive, IMAGE_TAG)
    # The key reaches pyinfra through the inventory, never a command line.
    inventory = write_inventory(tmp_path / "inventory.py", {name: {"vllm_api_key": API_KEY}})
    deploy_file = tmp_path / "image_runtime.py"
    # The roles of deploy.py up to the service; verify needs a container to run, which the
    # test hosts cannot (facts.md).
    deploy_file.write_text(
        "from roles.container_toolkit import container_toolkit\n"
        "from roles.nvidia_driver import nvidia_driver\n"
        "from roles.vllm_image import vllm_image\n"
        "from roles.vllm_service import vllm_service\n"
        "driver = nvidia_driver()\n"
        "toolkit = container_toolkit(driver=driver)\n"
        "vllm_service(restart_when=[*vllm_image(), *toolkit])\n"
    )
    data = {
        **DRIVER,
        **repos["toolkit"],
        "vllm_runtime": "image",
        "docker_source": "distro",
        "docker_version": None,
        "container_gpu_access": "gpus",
        "vllm_image_archive": str(archive),
    }
    # The unit starts `docker run`, whose container cannot run in a test host, and it has no
    # weights to start from: the start is the one step that fails, with systemd's words.
    run = pyinfra(inventory, str(deploy_file), "--limit", name, data=data)
    assert failed_steps(run, name) == ["vLLM service | (re)start vllm.service"], run.stderr[-4000:]
    assert "model weights in" in run.stderr and "are not complete" in run.stderr

    assert host.check_output(f"docker image inspect --format '{{{{.Id}}}}' {IMAGE_TAG}") == image_id
    assert not host.file("/var/lib/glmfleet/images/image.tar").exists  # loaded, then removed
    for package in TOOLKIT_PACKAGES:
        assert host.package(package).version == TOOLKIT_VERSION and package in held(host)
    assert "docker.io" in held(host)
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["log-opts"] == {"max-size": "10m"} and daemon["runtimes"]["nvidia"]
    assert host.service("docker").is_running

    unit = host.file("/etc/systemd/system/vllm.service").content_string
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith("ExecStart=/usr/bin/docker run --rm --name vllm --gpus all --network host --ipc host")
    assert f"--env-file /etc/glmfleet/vllm.env --entrypoint vllm {IMAGE_TAG} serve" in exec_start
    assert "ExecStop=/usr/bin/docker stop --time 45 vllm" in unit
    assert API_KEY not in unit
    env_file = host.file("/etc/glmfleet/vllm.env")
    assert env_file.mode == 0o600 and env_file.user == "root"
    assert f"VLLM_API_KEY={API_KEY}\n" in env_file.content_string  # Docker's --env-file takes values literally
    assert API_KEY not in host.check_output("ps -eo args")
    assert API_KEY not in run.stdout + run.stderr

    again = pyinfra(inventory, str(deploy_file), "--limit", name, data=data)
    # The unit is not active, so the service role starts it again, and that fails again.
    # Nothing else is planned: no upload, no load.
    assert again.started() == ["vLLM service | (re)start vllm.service"], again.stderr[-4000:]

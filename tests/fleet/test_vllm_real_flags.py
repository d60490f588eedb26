"""Flag validation against the real vLLM (each release the catalog names, with its dependencies,
from PyPI) in a fleet host's venv.

The fleet's hosts install it from a package index on loopback, as a mirror-only site would:
the wheels are downloaded once on this machine (about 4 GB a release, kept in .whl/). The host
first serves through the test double, as a serving host would through vLLM; a deploy that
switches it to the real vLLM with a bad flag must fail with vLLM's own message and leave that
running unit alone. The venv of the default model's release has test_vllm_real.py's root and
pins, so a session builds it once; every other release gets one venv, removed after its test.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from packaging.version import Version

from devfleet import localfleet
from glmfleet import catalog, groups
from glmfleet.config import ConfigError, resolve
from roles.vllm_flags import SCRIPT, check_command
from roles.vllm_service import serve_args
from roles.vllm_venv import flashinfer_kernels_command
from tests.support.fleettools import ROOT, TEST_DOUBLE, UV_VERSION, fleet_host, pyinfra
from tests.support.pkgindex import download_wheels

pytestmark = pytest.mark.fleet

UNIT = "/etc/systemd/system/vllm.service"
PINNED = resolve({}).vllm_version
# Every release the catalog names for a model, oldest first.
CHECKED = sorted({str(entry.vllm_checked) for entry in catalog.load().models.values()}, key=Version)


def wheelhouse(release: str):
    """vLLM ``release``, every wheel it needs and the pinned uv, downloaded once into .whl/."""
    wheels = ROOT / ".whl" / f"vllm-{release}-with-dependencies"
    if not (wheels / ".complete").exists():
        download_wheels([f"vllm=={release}", f"uv=={UV_VERSION}"], wheels, dependencies=True)
        (wheels / ".complete").touch()
    return wheels


@pytest.fixture(scope="module")
def vllm_index(tmp_path_factory):
    """release -> the URL of a static PEP 503 index of its wheelhouse, served on 127.0.0.1 by a
    threaded server: uv fetches some 190 wheels at once, more than the single-threaded
    pypiserver of tests/pkgindex.py accepts before connections time out."""
    servers = {}

    def index(release: str) -> str:
        if release not in servers:
            root = tmp_path_factory.mktemp(f"vllm-{release}-index")
            wheels = wheelhouse(release)
            (root / "files").symlink_to(wheels)
            for wheel in wheels.glob("*.whl"):
                project = root / "simple" / catalog.package_name(wheel.name.split("-", 1)[0])
                project.mkdir(parents=True, exist_ok=True)
                with (project / "index.html").open("a") as page:
                    page.write(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
            handler = functools.partial(QuietHandler, directory=str(root))
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers[release] = server
        return f"http://127.0.0.1:{servers[release].server_address[1]}/simple/"

    yield index
    for server in servers.values():
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def real(vllm_index, test_model):
    return {
        **test_model,
        "vllm_package": "vllm",
        # one release for every model these tests name (the catalog checked some with another)
        "vllm_version": PINNED,
        "vllm_venv_root": "/opt/glmfleet/vllm-real",
        "pip_index_url": vllm_index(PINNED),
        "nvidia_driver_source": TEST_DOUBLE["nvidia_driver_source"],
    }


@pytest.fixture(scope="module")
def serving(fleet, package_index, test_model):
    """The last fleet host serving through the test double; its unit's sha256 and main PID."""
    name = fleet[-1]
    fleet_host(name).run("systemctl reset-failed vllm.service")  # a test before may have left it failed
    run = pyinfra(
        "inventory/local.py",
        "deploy.py",
        "--limit",
        name,
        data={**TEST_DOUBLE, **test_model, "pip_index_url": package_index},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    host = fleet_host(name)
    return name, host.file(UNIT).sha256sum, main_pid(name)


def main_pid(name: str) -> str:
    return fleet_host(name).check_output("systemctl show --property MainPID --value vllm.service")


def still_serving(name: str) -> bool:
    port = dict(localfleet.inventory_hosts())[name]["vllm_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return response.status == 200


@pytest.mark.parametrize(
    ("bad_args", "message"),
    [
        (["--tensor-parralel-size", "2"], "vllm: error: unrecognized arguments: --tensor-parralel-size 2"),
        # Accepted up to 0.8.x (GLM-Z1 recipes used it); gone from the pinned vLLM.
        (["--enable-reasoning"], "vllm: error: unrecognized arguments: --enable-reasoning"),
    ],
)
def test_a_bad_flag_fails_the_host_and_leaves_the_running_unit_alone(serving, real, bad_args, message):
    name, unit_sha, pid = serving
    run = pyinfra(
        "inventory/local.py", "deploy.py", "--limit", name, data={**real, "vllm_extra_args": bad_args}, timeout=2400
    )
    assert run.returncode != 0
    assert f"vLLM {PINNED} refuses the command: {message}" in run.stderr
    host = fleet_host(name)
    assert host.file(UNIT).sha256sum == unit_sha
    assert main_pid(name) == pid
    assert still_serving(name)


def catalog_commands(release: str) -> list[list[str]]:
    """What follows `vllm serve` for every catalog entry that ``release`` serves, on every GPU
    generation whose rendering differs (the KV-cache dtype); an entry must resolve on the
    release the catalog checked it with."""
    commands = []
    for entry in catalog.load().models.values():
        data = {"model": entry.name, "vllm_version": release, "model_revision": "a" * 40}
        try:
            cfg = resolve(data)
        except ConfigError:
            assert Version(release) != entry.vllm_checked, f"{entry.name} does not resolve on its own release"
            continue
        for generation in (None, *entry.kv_cache_dtype):
            commands.append(serve_args(cfg, generation))
    return commands


def group_commands(release: str) -> list[list[str]]:
    """Each rank's command of two-host replica groups of GLM-5-FP8: tensor x pipeline parallel
    (a headless rank) and data parallel with expert parallel (hybrid load balancing)."""
    commands = []
    for layout in (
        {"vllm_tensor_parallel_size": 8, "vllm_pipeline_parallel_size": 2},
        {"vllm_data_parallel_size": 16, "vllm_enable_expert_parallel": True},
    ):
        common = {"model": "glm-5-fp8", "vllm_version": release, "model_revision": "a" * 40, **layout}
        ranks = {
            name: {**common, "vllm_group": "g", "vllm_group_rank": rank, "vllm_group_address": f"10.0.0.{rank + 1}"}
            for rank, name in enumerate(("gpu-a", "gpu-b"))
        }
        configs = {name: resolve(data, name) for name, data in ranks.items()}
        group = groups.replica_groups(configs)["g"]
        commands += [serve_args(configs[name], None, group) for name in group.ranks]
    return commands


@pytest.mark.parametrize("release", CHECKED)
def test_every_catalog_entry_is_accepted_by_the_real_parser_of_its_release(serving, real, vllm_index, release):
    name = serving[0]
    host = fleet_host(name)
    data = {
        **real,
        "vllm_version": release,
        "pip_index_url": vllm_index(release),
        # Offline here: the kernels' own command is checked below with --dry-run.
        "vllm_flashinfer_index_url": None,
    }
    if release != PINNED:
        data["vllm_venv_root"] = f"/opt/glmfleet/vllm-real-{release}"
    built = pyinfra("inventory/local.py", "roles.vllm_venv.vllm_venv", "--limit", name, data=data, timeout=2400)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        commands = catalog_commands(release) + group_commands(release)
        assert any("--headless" in command for command in commands)
        checked = {entry.name for entry in catalog.load().models.values() if str(entry.vllm_checked) == release}
        assert checked and len(commands) >= len(checked)
        python = f"{data['vllm_venv_root']}/current/bin/python"
        result = host.run(f"HF_HUB_OFFLINE=1 {python} {SCRIPT} --many <<'EOF'\n{json.dumps(commands)}\nEOF")
        verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(verdicts) == len(commands), result.stdout + result.stderr
        assert [v["message"] for v in verdicts if not v["ok"]] == []
        assert result.rc == 0
        kernels = flashinfer_kernels_command(
            resolve({**data, "vllm_flashinfer_index_url": "https://mirror.example/fi"}), python
        )
        if kernels is not None:
            # The command the venv role runs, as FlashInfer's own CLI reads it: what it would install, from where.
            dry = host.run(f"{kernels} --dry-run")
            assert dry.rc == 0, dry.stdout + dry.stderr
            out = re.sub(r"\x1b\[[0-9;]*m", "", dry.stdout + dry.stderr)
            assert "https://mirror.example/fi/cu130" in out and "https://mirror.example/fi" in out, out
    finally:
        if release != PINNED:
            host.run(f"rm -rf {shlex.quote(data['vllm_venv_root'])}")


def test_good_flags_pass_the_check(serving, real):
    name = serving[0]
    run = pyinfra(
        "inventory/local.py", "roles.vllm_flags.vllm_flags", "--limit", name, data={**real, "model": "glm-4.7"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"check vLLM flags | vllm serve flags accepted by vLLM {PINNED}" in run.changed()[name]


@pytest.mark.parametrize(
    "spelling", [["--api_key=sk-leak"], ["--api-k", "sk-leak"], ["--port=9"], ["--host", "0.0.0.0"]]
)
def test_vllms_own_parser_refuses_any_spelling_of_a_flag_a_key_sets(serving, real, spelling):
    """The host-side half of the flag guard: whatever the controller's spelling rules miss, vLLM's
    parser reads the command with and without the extra flags and they must agree on every flag
    glmfleet's keys set. (The controller refuses these spellings first: this runs the check
    directly, as a spelling it did not know would reach it.)"""
    cfg = resolve({**real, "model": "glm-4.7"})
    command = check_command(cfg)
    extra = " ".join(shlex.quote(arg) for arg in spelling)
    guard = json.loads(re.search(r"--guard '([^']*)'", command)[1])
    result = fleet_host(serving[0]).run(command + " " + extra)
    assert result.rc == 2, result.stdout + result.stderr
    # Refused as a flag glmfleet sets, or (an abbreviation vLLM's parser does not take) as unknown.
    assert "which glmfleet's own keys set" in result.stdout or "unrecognized arguments" in result.stdout, result.stdout
    assert guard["extra_from"] == len(serve_args(cfg))

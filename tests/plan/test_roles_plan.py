"""The new roles' pure parts: the commands they plan and the facts they read, run for real
where that needs no fleet (bash, ss, a real listening socket)."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess

import pytest

from glmfleet import FILES
from glmfleet.config import resolve
from glmfleet.facts.network import LISTENER_SERVICE, ListeningPorts
from roles import glm4_patch
from roles.preflight import fail_command, gpu_facts
from roles.vllm_flags import SCRIPT, check_command
from roles.vllm_service import vllm_command
from roles.vllm_venv import venv_name
from tests.support.paths import FIXTURES


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_listening_ports_fact_sees_a_real_listener():
    with socket.socket() as listener, socket.socket() as other:
        for sock in (listener, other):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        port, other_port = listener.getsockname()[1], other.getsockname()[1]
        fact = ListeningPorts()
        output = subprocess.run(["bash", "-c", fact.command()], capture_output=True, text=True, check=True).stdout
        listeners = fact.process(output.splitlines())
        output = subprocess.run(
            ["bash", "-c", fact.command(port=port)], capture_output=True, text=True, check=True
        ).stdout
        only_port = fact.process(output.splitlines())
    # This machine's PID 1 is not systemd: no process here belongs to a service.
    assert {(port, None), (other_port, None)} <= set(listeners)
    assert only_port == [(port, None)]


def test_listening_ports_names_the_first_holder_in_a_service(tmp_path):
    """ss lists every process holding a socket: a socket-activated port's holders include
    systemd (PID 1, in init.scope), in either order; a holder may be gone by the time it is read."""
    for pid, cgroup in {
        1: "/init.scope",
        300: "/system.slice/ssh.service",
        400: "/system.slice/vllm.service",
        500: "/user.slice/user-0.slice/session-1.scope",
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(f"0::{cgroup}\n")
    ss = (
        "\n".join(
            [
                'LISTEN 0 4096 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=300,fd=3),("systemd",pid=1,fd=40))',
                'LISTEN 0 4096 [::]:2222 [::]:* users:(("systemd",pid=1,fd=41),("sshd",pid=300,fd=4))',
                'LISTEN 0 2048 127.0.0.1:8000 0.0.0.0:* users:(("python3",pid=500,fd=5),("vllm",pid=400,fd=20))',
                'LISTEN 0 128 127.0.0.1:9000 0.0.0.0:* users:(("nc",pid=500,fd=3))',
                'LISTEN 0 128 127.0.0.1:9001 0.0.0.0:* users:(("gone",pid=999,fd=3))',
                "LISTEN 0 128 [::1]:9002 [::]:*",  # a process this host cannot see
            ]
        )
        + "\n"
    )
    output = subprocess.run(
        ["awk", "-v", f"proc={tmp_path}", LISTENER_SERVICE], input=ss, capture_output=True, text=True, check=True
    ).stdout
    assert ListeningPorts().process(output.splitlines()) == [
        (22, "ssh.service"),
        (2222, "ssh.service"),
        (8000, "vllm.service"),
        (9000, None),
        (9001, None),
        (9002, None),
    ]


def test_listening_ports_fact_reads_the_service_of_each_holder():
    output = ["22 ssh.service", "8000 vllm.service", "9000 -", "not-a-port x"]
    assert ListeningPorts().process(output) == [(22, "ssh.service"), (8000, "vllm.service"), (9000, None)]


def test_preflight_failure_prints_each_problem_and_fails():
    problems = ["gpu-1: vllm_port = 8000 is already in use by a process outside any systemd service: it's $HOME `x`"]
    completed = subprocess.run(["bash", "-c", fail_command(problems)], capture_output=True, text=True)
    assert completed.returncode == 1 and completed.stderr == problems[0] + "\n"


def test_flag_check_runs_the_pinned_venvs_python_on_the_units_arguments():
    cfg = resolve({"model": "glm-4.7", "vllm_extra_args": ["--enable-prefix-caching"], "model_revision": "a" * 40})
    command = check_command(cfg)
    assert command.startswith("HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 ")
    assert f"/opt/glmfleet/vllm/venvs/{venv_name(cfg)}/bin/python {SCRIPT} --guard " in command
    assert f" -- /var/lib/glmfleet/models/zai-org--GLM-4.7/{'a' * 40} --host 127.0.0.1" in command
    assert command.endswith(
        "--tool-call-parser glm47 --enable-auto-tool-choice --reasoning-parser glm45 --shutdown-timeout 30 "
        "--enable-prefix-caching"
    )


@pytest.mark.parametrize(
    ("data", "patched"),
    [
        ({"vllm_version": "0.8.4"}, True),
        ({"vllm_version": "0.8.5"}, False),
        ({"vllm_version": "0.22.0"}, False),
        ({}, False),
        ({"vllm_package": "vllm-test-double", "vllm_version": "0.8.4"}, False),
    ],
)
def test_only_vllm_084_is_patched(data, patched):
    assert glm4_patch.needs_patch(resolve({"model": "glm-4-9b-0414", **data})) is patched


def test_patch_file_states_the_checksums_the_role_passes():
    header = (FILES / "glm4-0.8.4.patch").read_text().split("\n--- ", 1)[0]
    assert glm4_patch.ORIGINAL_SHA256 in header and glm4_patch.PATCHED_SHA256 in header
    assert re.search(r"^--- a/vllm/model_executor/models/glm4\.py$", (FILES / "glm4-0.8.4.patch").read_text(), re.M)


RECIPE_IN_IMAGE = {
    "model": "glm-z1-32b-0414",
    "vllm_runtime": "image",
    "vllm_version": "0.8.4",
    "vllm_tensor_parallel_size": 4,
    "model_revision": "a" * 40,
}


def test_image_runtime_derives_the_patched_file_from_the_images_copy():
    command = glm4_patch.derive_command("vllm/vllm-openai:v0.8.4")
    assert command.startswith("set -e; id=$(docker create vllm/vllm-openai:v0.8.4); trap ")
    assert f'docker cp "$id:"{glm4_patch.IMAGE_GLM4} {glm4_patch.PATCHED_FOR_IMAGE}.image;' in command
    assert (
        f"python3 {glm4_patch.SCRIPT} derive --original {glm4_patch.ORIGINAL_SHA256} --patched {glm4_patch.PATCHED_SHA256} "
        f"{glm4_patch.PATCH} {glm4_patch.PATCHED_FOR_IMAGE}.image {glm4_patch.PATCHED_FOR_IMAGE}"
    ) in command
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


@pytest.mark.parametrize(("version", "mounted"), [("0.8.4", True), ("0.8.5", False)])
def test_image_runtime_lays_the_patched_file_read_only_over_the_images_own(version, mounted):
    argv = vllm_command(resolve({**RECIPE_IN_IMAGE, "vllm_version": version}))
    volume = (
        f"{glm4_patch.PATCHED_FOR_IMAGE}:/usr/local/lib/python3.12/dist-packages/vllm/model_executor/models/glm4.py:ro"
    )
    assert (volume in argv) is mounted
    if mounted:
        assert argv[argv.index(volume) - 1] == "--volume" and argv.index(volume) < argv.index("serve")


def test_image_runtime_checks_flags_with_the_images_own_vllm_offline():
    command = check_command(resolve(RECIPE_IN_IMAGE))
    assert command.startswith("docker run --rm --interactive --network none --env HF_HUB_OFFLINE=1 ")
    assert "--entrypoint python3 vllm/vllm-openai:v0.8.4 - --guard " in command
    assert f" -- /var/lib/glmfleet/models/zai-org--GLM-Z1-32B-0414/{'a' * 40} --host 127.0.0.1" in command
    assert command.endswith(f"--tensor-parallel-size 4 --gpu-memory-utilization 0.9 < {SCRIPT}")


def gpu_fact_from(fixture: str) -> dict:
    """The GpuHost fact, parsed by its own code from real nvidia-smi output in tests/fixtures."""
    from glmfleet.facts.gpu import gpu_host
    from glmfleet.facts.output import split_sections

    captured = FIXTURES / fixture
    output = [
        "::glmfleet:: smi",
        *(captured / "nvidia-smi-query-gpu.txt").read_text().splitlines(),
        "::glmfleet:: cuda",
        *(captured / "nvidia-smi.txt").read_text().splitlines(),
    ]
    return gpu_host(split_sections(output))


def test_gpu_checks_wait_for_a_driver_that_answers():
    assert gpu_facts(gpu_fact_from("nodriver")) == {
        "gpu_count": None,
        "gpu_memory_mib": None,
        "gpu_generation": None,
        "driver_cuda_version": None,
    }


def test_gpu_checks_read_count_memory_and_cuda_from_a_real_h200():
    assert gpu_facts(gpu_fact_from("h200")) == {
        "gpu_count": 1,
        "gpu_memory_mib": 143771,
        "gpu_generation": "hopper",
        "driver_cuda_version": "13.0",
    }


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"model": "glm-4.7-flash"}, None),
        ({"model": "glm-4.7-flash", "vllm_tensor_parallel_size": 2}, "needs 2 GPUs, the host has 1"),
        ({"model": "glm-4.5-air"}, "'zai-org/GLM-4.5-Air' (206 GiB of bf16 weights) needs about"),
        # FP8 weights on Hopper: fine; one H200 holds GLM-4.5-Air-FP8 with a shorter context.
        ({"model": "glm-4.5-air-fp8", "vllm_max_model_len": 32768}, None),
        ({"model": "glm-5-fp8"}, "or span 6 hosts of 1 such GPUs"),
        ({"model": "glm-4-9b-0414", "vllm_version": "0.19.1"}, None),  # CUDA 12.8 torch on a CUDA 13.0 driver
    ],
)
def test_preflight_on_a_real_h200(data, words):
    from glmfleet import compat
    from glmfleet.config import all_settings, values

    found = compat.host_problems(values(data, all_settings()), **gpu_facts(gpu_fact_from("h200")))
    assert (found == []) if words is None else (len(found) == 1 and words in found[0]), found


def test_gpu_checks_take_the_smallest_gpu():
    cards = [{"memory_mib": 81920}, {"memory_mib": 81920}, {"memory_mib": 49152}]
    assert gpu_facts({"smi": cards, "cuda_version": "12.8"}) == {
        "gpu_count": 3,
        "gpu_memory_mib": 49152,
        "gpu_generation": None,
        "driver_cuda_version": "12.8",
    }


def test_a_new_venv_becomes_current_only_after_the_flags_are_accepted():
    """A flag the new vLLM refuses fails the host with `current` (what the unit runs) untouched."""
    from roles import serving_host
    from tests.support.planning import plan, sectioned_output

    data = {
        "nvidia_driver_source": "none",
        "model_revision": "0123456789abcdef" * 2 + "01234567",
        "vllm_version": "0.22.0",
    }
    ops = [
        op.name
        for op in plan(
            serving_host,
            data,
            {"::glmfleet:: os": sectioned_output(os="debian|12|bookworm"), "command -v useradd": ["/usr/sbin/useradd"]},
        )
    ]
    build = next(i for i, name in enumerate(ops) if name.startswith("vLLM venv | build venv"))
    flags = next(i for i, name in enumerate(ops) if "flags accepted" in name)
    switch = next(i for i, name in enumerate(ops) if "switch current venv" in name)
    restart = next(i for i, name in enumerate(ops) if "(re)start vllm.service" in name)
    assert build < flags < switch < restart, ops


def test_flags_are_checked_only_when_the_unit_or_the_current_venv_would_change():
    from roles.vllm_flags import vllm_flags
    from roles.vllm_service import UNIT_PATH, render_unit
    from tests.support.planning import plan

    data = {"model_revision": "0123456789abcdef" * 2 + "01234567", "vllm_version": "0.22.0"}
    cfg = resolve(data, "@fake/gpu-1")
    unit = f"path\t{UNIT_PATH}\tf|root|root|644"  # the ManagedPaths command's find and sha256sum lines
    rendered = [unit, f"{hashlib.sha256(render_unit(cfg).encode()).hexdigest()}  {UNIT_PATH}"]
    current = [f"current=venvs/{venv_name(cfg)}"]
    # The unit as rendered and the venv already current: vLLM accepted these flags before.
    assert plan(vllm_flags, data, {UNIT_PATH: rendered, "find current previous": current}) == []
    # Another unit on the host, or another venv to switch to: the new vLLM checks the flags.
    for responses in (
        {UNIT_PATH: [unit, f"{'0' * 64}  {UNIT_PATH}"], "find current previous": current},
        {UNIT_PATH: rendered, "find current previous": ["current=venvs/vllm-0.21.0-0000"]},
    ):
        assert [op.name for op in plan(vllm_flags, data, responses)][-1].endswith("flags accepted by vLLM 0.22.0")


def test_a_rollout_stages_without_asking_the_serving_host_for_a_request():
    """Staging runs beside the serving vLLM: it asks only what its roles read, so neither the
    real-request check nor any other serving role's fact goes to the host then. (A host
    reached over SSH is asked no VllmServes at all: the controller makes the request.)"""
    from pyinfra.context import ctx_host

    from glmfleet.facts.vllm import VllmServes
    from roles import SERVING_ROLES, STAGING_ROLES
    from tests.support.planning import fake_host

    cfg = resolve({"model_revision": "0" * 40}, "@fake/gpu-1")
    with ctx_host.use(fake_host({}, {})[1]):  # the fake connector holds no SSH connection: VllmServes is asked
        asked = {role: {question.fact for question in role.questions(cfg).values()} for role in SERVING_ROLES}
    assert VllmServes in set().union(*asked.values())
    assert VllmServes not in set().union(*(asked[role] for role in STAGING_ROLES))


def test_verify_plans_its_check_only_where_the_host_does_not_serve():
    """The check that ran while planning is the whole check on a host that serves and where
    nothing changed: a converged host plans no operation at all."""
    from roles.verify import verify
    from tests.support.planning import plan

    def planned(answer: list[str]) -> list[str]:
        return [op.name for op in plan(verify, {"model_revision": "0" * 40}, {"--deadline 0": answer})]

    assert planned(["serving: 'm' answered a chat completion: 'Hi'", "rc=0"]) == ["verify vLLM serves | verify script"]
    assert planned(["not serving after 0 s: no answer", "rc=1"]) == [
        "verify vLLM serves | verify script",
        "verify vLLM serves | verify a real request is served",
    ]


def test_verify_checks_again_after_a_planned_change_though_the_host_served():
    from pyinfra.operations import server

    from roles.verify import verify
    from tests.support.planning import plan

    def restart_then_verify():
        verify(changes=[server.shell(name="restart", commands=["true"])])

    serving = {"--deadline 0": ["serving: 'm' answered a chat completion: 'Hi'", "rc=0"]}
    assert [op.name for op in plan(restart_then_verify, {"model_revision": "0" * 40}, serving)][-1] == (
        "verify vLLM serves | verify a real request is served"
    )


@pytest.mark.parametrize(
    ("version", "fetched"),
    [("0.22.0", False), ("0.31.0", False), ("0.32.0", True), ("0.33.0", True)],
)
def test_flashinfer_kernels_are_installed_with_the_venv_where_the_release_would_fetch_them_at_start(version, fetched):
    """From 0.32 the venv build runs FlashInfer's own download-kernels against the configured
    mirror (its credentials in the netrc, never on the command line); 0.22 .. 0.25 ship them with
    the wheel; 0.26 .. 0.31 have no command for it (README: air-gapped sites)."""
    from roles.vllm_venv import vllm_venv
    from tests.support.planning import plan

    data = {
        "model": "glm-5.1",
        "vllm_version": version,
        "vllm_flashinfer_index_url": "https://mirror-user:s3cret@mirror.example/flashinfer/",
        "vllm_extra_packages": ["transformers==5.16.1"] if version < "0.32.0" else [],
    }
    ops = plan(vllm_venv, data, {"command -v useradd": ["/usr/sbin/useradd"]})
    build = next(op for op in ops if op.name.startswith("vLLM venv | build venv"))
    command = " ".join(build.commands)
    assert ("-m flashinfer download-kernels" in command) is fetched
    assert "s3cret" not in command and "mirror-user" not in command
    if fetched:
        assert (
            "--cubin-index-url https://mirror.example/flashinfer --jit-cache-index-url "
            "https://mirror.example/flashinfer/cu130" in command
        )
        assert command.index("download-kernels") < command.index("import os, sys")  # before the marker

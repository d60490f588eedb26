"""The GPU stack's data keys: values that are wrong together are refused before any host is
touched, each message naming key, value and the fix; and the image runtime's command line."""

from __future__ import annotations

import pytest

from glmfleet.config import ConfigError, resolve
from roles.vllm_service import render_env_file, vllm_command, vllm_environment
from tests.support.imagearchive import write_image_archive


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"nvidia_driver_branch": "580", "nvidia_driver_version": "570.172.08"},
            "nvidia_driver_version = '570.172.08' is not in nvidia_driver_branch = '580'; set nvidia_driver_branch to '570'",
        ),
        (
            {"vllm_runtime": "image", "docker_source": "distro", "docker_version": None},
            "docker_source = 'distro' with container_gpu_access = 'cdi'",
        ),
        (
            {"vllm_runtime": "image", "docker_source": "distro", "container_gpu_access": "gpus"},
            "docker_version = '5:28.5.1-1~*' is a version of Docker's repository",
        ),
        (
            {"vllm_runtime": "image", "vllm_image_archive": "/nonexistent/vllm.tar"},
            "vllm_image_archive = '/nonexistent/vllm.tar' is not a file on this control node",
        ),
    ],
)
def test_impossible_gpu_stack_combinations_are_refused(data, expected):
    with pytest.raises(ConfigError) as error:
        resolve(data, "gpu-1")
    assert f"gpu-1: {expected}" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("nvidia_driver_source", "runfile"),
        ("nvidia_driver_branch", "58"),
        ("nvidia_driver_version", "latest"),
        ("nvidia_cuda_repo_key_sha256", "abc"),
        ("vllm_runtime", "podman"),
        ("vllm_image_digest", "sha256:xyz"),
        ("container_gpu_access", "all"),
        ("nvidia_container_toolkit_version", "latest"),
    ],
)
def test_bad_gpu_stack_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"gpu-1: {key} = {value!r} is invalid"):
        resolve({key: value}, "gpu-1")


def test_archive_must_hold_the_configured_tag(tmp_path):
    archive = tmp_path / "vllm.tar"
    write_image_archive(archive, "vllm/vllm-openai:v0.21.0")
    with pytest.raises(ConfigError) as error:
        resolve({"vllm_runtime": "image", "vllm_image_archive": str(archive)}, "gpu-1")
    assert "holds ['vllm/vllm-openai:v0.21.0'], not vllm/vllm-openai:v0.22.0" in str(error.value)
    assert resolve({"vllm_runtime": "image", "vllm_image_archive": str(archive), "vllm_image_tag": "v0.21.0"})


def test_image_command_runs_the_digest_with_cdi_devices_and_no_secret():
    digest = "sha256:" + "c" * 64
    cfg = resolve(
        {"vllm_runtime": "image", "vllm_image_digest": digest, "vllm_api_key": "sk-test-9", "model_dir": "/srv/glm"}
    )
    argv = vllm_command(cfg)
    assert argv[:5] == ["/usr/bin/docker", "run", "--rm", "--name", "vllm"]
    assert argv[argv.index("--device") + 1] == "nvidia.com/gpu=all" and "--gpus" not in argv
    assert "/srv/glm:/srv/glm:ro" in argv and "/var/lib/vllm:/var/lib/vllm" in argv
    image = argv.index(f"vllm/vllm-openai@{digest}")
    assert argv[image - 2 : image] == ["--entrypoint", "vllm"] and argv[image + 1 : image + 3] == ["serve", "/srv/glm"]
    assert "sk-test-9" not in " ".join(argv)
    assert "VLLM_API_KEY=sk-test-9\n" in render_env_file(vllm_environment(cfg), "image")

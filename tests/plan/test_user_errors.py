"""Errors a user can cause, through the real `pyinfra` command against pyinfra's @fake host: each
names the key, the value and the fix, and none is a traceback. (Errors that need a real host are
in the fleet tests.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

REVISION = "a" * 40


def run_deploy(*data: str) -> subprocess.CompletedProcess:
    argv = [
        str(Path(sys.executable).parent / "pyinfra"),
        "-y",
        "@fake/gpu-1",
        "deploy.py",
        "--data",
        f"model_revision={REVISION}",
    ]
    for pair in data:
        argv += ["--data", pair]
    return subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYINFRA_FAKE_DELAY": "0", "PYINFRA_FAKE_DELAY_JITTER": "0"},
    )


@pytest.fixture
def key_dir(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    return directory


def operators_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator@laptop", "-f", str(key)], check=True)
    return key


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            ["nvidia_cuda_repo_url=https://mirror.example/{foo}/x"],
            "nvidia_cuda_repo_url = 'https://mirror.example/{foo}/x' is invalid; accepted: an http(s) or file URL (placeholders: "
            "{distro} and {arch})",
        ),
        (
            ["vllm_host=0.0.0.0"],
            "vllm_host = '0.0.0.0' serves every client that reaches the port, and vllm_api_key is not set",
        ),
        (
            ['vllm_extra_args=["--api_key=sk-x"]'],
            "vllm_extra_args contains '--api_key' (vLLM reads it as '--api-key'); set vllm_api_key instead",
        ),
        (
            [
                "pip_index_url=https://user:pw-4242@mirror.example/simple",
                'pip_extra_index_url=["https://user:other@mirror.example/x"]',
            ],
            "pip_extra_index_url: the URL for mirror.example carries other credentials than pip_index_url's",
        ),
    ],
)
def test_bad_configuration_is_an_error_naming_key_value_and_fix(data, words):
    result = run_deploy(*data)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "no host was changed" in result.stderr
    assert "pw-4242" not in result.stderr + result.stdout  # a URL's password is masked even in errors


def test_a_transfer_key_glmfleet_did_not_make_is_refused(key_dir):
    key = operators_key(key_dir)
    result = run_deploy("model_source=peer", f"model_peer_key={key}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        f"{key}.pub is not a key glmfleet made" in result.stderr
        and "never hands an operator's own key" in result.stderr
    )


def test_a_transfer_key_without_its_pair_is_an_error_not_a_traceback(key_dir):
    key = key_dir / "peer"
    key.write_text("not a key\n")
    key.chmod(0o600)
    result = run_deploy("model_source=peer", f"model_peer_key={key}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"model_peer_key: {key} and {key}.pub are not both files" in result.stderr


def test_a_transfer_key_in_the_deploy_directory_is_refused():
    result = run_deploy("model_source=peer", f"model_peer_key={ROOT}/.glmfleet/peer_ed25519")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is inside the deploy directory" in result.stderr and "gets committed and published" in result.stderr
    assert not (ROOT / ".glmfleet" / "peer_ed25519").exists()

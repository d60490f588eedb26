"""Model weights without fleet hosts: the real hf CLI against a real mirror (olah) on loopback,
the host script's manifest, verification, resume and disk check on real files, and the
fan-out schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmfleet.config import ConfigError, resolve
from glmfleet.facts.output import host_script
from glmfleet.facts.weights import ModelWeights
from glmfleet.layout import model_dir as model_path
from glmfleet.layout import weights_state_file as state_path
from roles.model_weights import hub_environment, sync_argv
from tests.support.hub_mirror import file_sha256, git
from tests.support.hub_refusals import HubRefusal
from tests.support.weights_fixtures import HF_CLI, REPO_ID, SCRIPT, sync
from tests.support.weights_fixtures import sync_argv as script_sync_argv

glmfleet_weights = host_script("glmfleet_weights")  # the host script, for its classifier

SHARDS = "model-*.safetensors"


def weights_fact(directory: Path, state: Path) -> dict:
    """The deploy's ModelWeights fact, its command run here by sh over the real files."""
    fact = ModelWeights()
    output = subprocess.run(
        ["sh", "-c", fact.command(str(state), str(directory), "k", [])], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return {name: fact.process(output)[name] for name in ("complete", "reason", "changed")}


def test_an_odd_weights_answer_is_read_as_not_complete_and_odd_lines_as_gone_files():
    fact = ModelWeights()
    assert fact.process(["::glmfleet:: key", "k", "::glmfleet:: state", "[]"])["reason"] == "unreadable state file: []"
    state = json.dumps({"key": "k", "complete": True, "verified": {"a": [1, 2, 3, 4], "b\nc": [1, 2, 3, 5]}})
    answer = [
        "::glmfleet:: key",
        "k",
        "::glmfleet:: state",
        state,
        "::glmfleet:: files",
        "a\t1\t0.0000000020\t0.0000000030\t4",
        "b",
        "c\t1\t0.0000000020\t0.0000000030\t5",
    ]
    assert {k: fact.process(answer)[k] for k in ("complete", "changed")} == {"complete": False, "changed": ["b\nc"]}


def shard_inodes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in sorted(directory.glob(SHARDS))}


@pytest.fixture
def tmpfs(tmp_path):
    """A small real filesystem (tmpfs), for a disk that is too small."""
    mounts = []

    def mount(size_mb: int) -> Path:
        target = tmp_path / f"small-{len(mounts)}"
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=755", "tmpfs", str(target)], check=True)
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", str(target)], check=True)


# --- schedule and configuration -----------------------------------------------------------------


@pytest.mark.parametrize("revision", ["main", "v1.0", "abc123", "A" * 40])
def test_a_revision_that_is_not_a_commit_is_rejected(revision):
    with pytest.raises(ConfigError) as error:
        resolve({"model_revision": revision}, "gpu-1")
    assert f"gpu-1: model_revision = {revision!r} is invalid; accepted: a 40-hex commit id" in str(error.value)


def test_a_path_as_model_is_refused_with_the_keys_that_serve_a_directory():
    with pytest.raises(ConfigError) as error:
        resolve({"model": "/srv/models/glm", "model_revision": "c" * 40}, "gpu-1")
    assert "gpu-1: model = '/srv/models/glm' is a path: set model_dir to it (with model_source 'path')" in str(
        error.value
    )


def test_a_model_and_revision_always_map_to_one_directory_and_state():
    cfg = resolve({"model": "zai-org/GLM-4.7-Flash", "model_revision": "c" * 40})
    assert model_path(cfg) == "/var/lib/glmfleet/models/zai-org--GLM-4.7-Flash/" + "c" * 40
    assert (
        state_path(cfg)
        == "/var/lib/glmfleet/weights/var-lib-glmfleet-models-zai-org--GLM-4.7-Flash-" + "c" * 40 + ".json"
    )


def test_the_hub_token_and_endpoint_are_passed_in_a_file_never_on_the_command_line():
    cfg = resolve(
        {"model_revision": "c" * 40, "hf_token": "hf_secret_4242", "hf_endpoint": "http://user:pw4242@127.0.0.1:9/"}
    )
    argv = sync_argv(cfg, "hf")
    assert "4242" not in " ".join(argv)
    assert argv[argv.index("--env-file") + 1] == "/etc/glmfleet/hub.env"
    assert hub_environment(cfg, "hf") == {
        "HF_ENDPOINT": "http://user:pw4242@127.0.0.1:9/",
        "HF_TOKEN": "hf_secret_4242",
    }


# --- the real hf CLI against the real mirror ------------------------------------------------------


def test_hf_fetch_is_verified_against_the_hubs_own_manifest(hub, tmp_path):
    directory, state = tmp_path / "model", tmp_path / "state.json"
    result = sync(directory, state, hub.url, hub.revision)
    assert result.returncode == 0, result.stderr
    assert "complete, 12 files verified against the manifest (hub tree)" in result.stdout
    manifest = json.loads((directory / ".glmfleet" / "manifest.json").read_text())
    repo = hub.checkpoint.parent / "mirrors" / "models" / REPO_ID
    for name, entry in manifest["files"].items():
        if name.endswith(".safetensors"):
            assert entry["sha256"] == file_sha256(hub.checkpoint / name)  # the LFS oid the mirror published
        else:
            assert entry["git_blob"] == git(repo, "rev-parse", f"{hub.revision}:{name}")
    assert json.loads(state.read_text())["complete"] is True
    check = subprocess.run(
        [sys.executable, str(SCRIPT), "check", "--dir", str(directory), "--state", str(state), "--key", "k"]
    )
    assert check.returncode == 0


def test_a_corrupted_shard_is_found_and_only_it_is_fetched_again(hub, tmp_path):
    directory, state = tmp_path / "model", tmp_path / "state.json"
    assert sync(directory, state, hub.url, hub.revision).returncode == 0
    before = shard_inodes(directory)
    victim = sorted(before)[2]
    assert weights_fact(directory, state) == {"complete": True, "reason": "complete", "changed": []}
    (tmp_path / "linked").symlink_to(directory)  # a model_dir that links elsewhere, as the unit's check follows it
    assert weights_fact(tmp_path / "linked", state)["complete"] is True
    with open(directory / victim, "r+b") as f:  # same size, different bytes: only the stat tells
        f.seek(1_000_000)
        f.write(b"\xff" * 16)

    assert weights_fact(directory, state) == {
        "complete": False,
        "reason": "files changed since verified",
        "changed": [victim],
    }

    mark = hub.log_mark()
    result = sync(directory, state, hub.url, hub.revision)
    assert result.returncode == 0, result.stderr
    assert f"{victim}: sha256 does not match the manifest; removed" in result.stdout
    assert hub.downloads_since(mark) == [victim]
    after = shard_inodes(directory)
    assert {n for n in before if before[n] != after[n]} == {victim}
    assert file_sha256(directory / victim) == file_sha256(hub.checkpoint / victim)


def test_a_killed_download_resumes_without_serving_a_partial_file(hub, tmp_path):
    directory, state = tmp_path / "model", tmp_path / "state.json"
    argv_state = ["--dir", str(directory), "--state", str(state), "--key", "k"]
    mark = hub.log_mark()
    # Throttle-free: poll until some shards are in place, then kill the whole process group.
    process = subprocess.Popen(
        script_sync_argv(directory, state, hub.url, hub.revision, env={"HF_HUB_DOWNLOAD_WORKERS": "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(directory.glob(SHARDS))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = shard_inodes(directory)
    assert 2 <= len(finished) < 5, "the kill came too late to interrupt the transfer"
    for name in finished:  # what is at a final path is whole; the rest waits in .incomplete files
        assert file_sha256(directory / name) == file_sha256(hub.checkpoint / name)
    check = subprocess.run([sys.executable, str(SCRIPT), "check", *argv_state], capture_output=True, text=True)
    assert check.returncode == 1 and "not complete (unfinished)" in check.stderr

    served_before_kill = set(hub.downloads_since(mark))
    mark = hub.log_mark()
    result = sync(directory, state, hub.url, hub.revision)
    assert result.returncode == 0, result.stderr
    fetched_again = set(hub.downloads_since(mark))
    assert not fetched_again & set(finished), "finished shards were transferred again"
    assert {n for n, ino in shard_inodes(directory).items() if finished.get(n, ino) != ino} == set()
    assert len(shard_inodes(directory)) == 5 and served_before_kill  # and the first run did start


def test_a_disk_too_small_fails_before_any_transfer(hub, tmp_path, tmpfs):
    directory, state = tmpfs(100) / "model", tmp_path / "state.json"
    mark = hub.log_mark()
    result = sync(directory, state, hub.url, hub.revision, "--margin-bytes", str(50 * 10**6))
    assert result.returncode == 1
    assert "not enough disk for glmfleet-test/tiny-glm" in result.stderr
    assert "+ 50.0 MB margin" in result.stderr and "Nothing was transferred" in result.stderr
    assert hub.downloads_since(mark) == []
    assert not list(directory.glob(SHARDS))


# --- the real CLI's errors, classified ------------------------------------------------------------


def run_hf(endpoint: str, local_dir: Path, repo: str, revision: str, token: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(local_dir.parent / "hf-home"))
    if token:
        env["HF_TOKEN"] = token
    process = subprocess.run(
        [HF_CLI, "download", repo, "--revision", revision, "--local-dir", str(local_dir)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert process.returncode != 0
    return process.stdout + process.stderr


@pytest.mark.parametrize("case", ["missing repository", "missing revision"])
def test_the_mirrors_not_found_answers_are_classified(hub, tmp_path, case):
    repo, revision = {
        "missing repository": ("glmfleet-test/missing", hub.revision),
        "missing revision": (REPO_ID, "0" * 40),
    }[case]
    kind, advice = glmfleet_weights.classify(run_hf(hub.url, tmp_path / "m", repo, revision))
    assert kind == "not found" and "model_revision" in advice


@pytest.mark.parametrize(
    ("refusal", "kind", "advice"),
    [
        ("gated", "gated model", "accept the model's license"),
        ("bad_token", "bad token", "check hf_token"),
        ("rate_limited", "rate limited", "model_source 'peer'"),
    ],
)
def test_the_hubs_refusals_are_classified(tmp_path, refusal, kind, advice):
    with HubRefusal(refusal) as refusing_hub:
        output = run_hf(refusing_hub.url, tmp_path / "m", "glmfleet-test/gated", "a" * 40, token="hf_test_token")
    assert glmfleet_weights.classify(output)[0] == kind
    assert advice in glmfleet_weights.classify(output)[1]


def test_a_full_disk_during_the_transfer_is_classified(hub, tmp_path, tmpfs):
    output = run_hf(hub.url, tmpfs(100) / "m", REPO_ID, hub.revision)
    assert glmfleet_weights.classify(output)[0] == "disk full"


def test_sync_names_the_cause_and_the_token_reaches_the_hub_only_by_environment(tmp_path):
    with HubRefusal("gated") as refusing_hub:
        result = sync(
            tmp_path / "model",
            tmp_path / "state.json",
            refusing_hub.url,
            "a" * 40,
            repo="glmfleet-test/gated",
            env={"HF_TOKEN": "hf_file_token_4242"},
        )
    assert result.returncode == 1
    assert "failed: gated model: accept the model's license on its hub page" in result.stderr
    assert "Bearer hf_file_token_4242" in refusing_hub.authorizations

"""The `modelscope` weights source end to end: the real `modelscope` CLI (modelscope 1.40.2 with
modelscope-hub 0.5.1, installed by the role from a package index on loopback) on a fleet host,
against the ModelScope hub's file API served on loopback by tests/modelscope_test_double.py,
with the same checks as the hub source: manifest, sha256, resume, refusals classified.

The tests run in file order on one host: each starts from where the one before left it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from glmfleet.config import resolve
from glmfleet.layout import model_dir, weights_check_argv, weights_state_file
from glmfleet.shell import join
from tests.support.fleettools import fleet_host
from tests.support.hub_mirror import file_sha256
from tests.support.model_maker import make_checkpoint
from tests.support.modelscope_test_double import ModelScopeTestDouble
from tests.support.pkgindex import PackageIndex
from tests.support.weights_fixtures import deploy_weights, digests, inventory

pytestmark = pytest.mark.fleet

REPO = "glmfleet-test/tiny-glm-ms"
REVISION = "5c0a" * 10
PINS = ["modelscope==1.40.2", "modelscope-hub==0.5.1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("ms-checkpoint") / "checkpoint", size_bytes=40 * 2**20, shard_bytes=10 * 2**20
    )


@pytest.fixture(scope="module")
def hub(checkpoint, tmp_path_factory):
    repos = tmp_path_factory.mktemp("ms-repos")
    shutil.copytree(checkpoint, repos / REPO / REVISION, copy_function=shutil.copy)
    with ModelScopeTestDouble(repos) as double:
        yield double


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("ms-cli-wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels), *PINS],
        check=True,
    )
    with PackageIndex(wheels) as index:
        yield index.url


@pytest.fixture(scope="module")
def host(fleet):
    return fleet[0]


@pytest.fixture(scope="module")
def settings(hub, cli_index):
    return {
        "model": REPO,
        "model_revision": REVISION,
        "model_source": "modelscope",
        "modelscope_domain": hub.url,
        "pip_index_url": cli_index,
        "model_disk_margin_gb": 0.05,
        "model_progress_interval": 1,
    }


@pytest.fixture(scope="module")
def cfg(settings):
    return resolve(settings)


def files_requested(hub, since: int) -> list[str]:
    return [path.split("FilePath=", 1)[1] for path in hub.requests[since:] if "FilePath=" in path]


def complete(host: str, cfg) -> bool:
    return fleet_host(host).run(join(weights_check_argv(cfg))).rc == 0


def forget(host: str, cfg) -> None:
    fleet_host(host).check_output(f"rm -rf {model_dir(cfg)} {weights_state_file(cfg)}")


@pytest.fixture(scope="module")
def first_run(host, hub, settings, cfg, tmp_path_factory):
    forget(host, cfg)
    run = deploy_weights(inventory(tmp_path_factory.mktemp("ms"), [host]), settings)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_the_real_cli_fetches_every_file_verified_against_a_manifest(first_run, host, checkpoint, cfg):
    assert "files verified against the manifest (computed on the seed)" in first_run.stderr
    assert complete(host, cfg)
    assert digests(host, model_dir(cfg), "*") == {p.name: file_sha256(p) for p in checkpoint.iterdir() if p.is_file()}
    # The CLI kept its session and settings in glmfleet's cache, not in root's home.
    assert not fleet_host(host).file("/root/.modelscope").exists


def test_a_second_run_changes_nothing_and_asks_the_hub_nothing(first_run, host, hub, settings, tmp_path):
    mark = len(hub.requests)
    run = deploy_weights(inventory(tmp_path, [host]), settings)
    assert run.returncode == 0 and run.changed() == {}
    assert hub.requests[mark:] == []


def test_a_corrupted_file_is_fetched_again_alone(first_run, host, hub, settings, cfg, tmp_path):
    victim = sorted(digests(host, model_dir(cfg)))[1]
    fleet_host(host).check_output(f"printf 'rot' | dd of={model_dir(cfg)}/{victim} bs=1 seek=4096 conv=notrunc")
    mark = len(hub.requests)
    run = deploy_weights(inventory(tmp_path, [host]), settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{victim}: sha256 does not match the manifest; removed" in run.stderr
    assert files_requested(hub, mark) == [victim] and complete(host, resolve(settings))


def test_a_download_cut_midway_resumes(first_run, host, hub, settings, cfg, tmp_path):
    forget(host, cfg)
    hub.interrupt(after_bytes=2 * 2**20, name="model-00002-of-00005.safetensors")
    ranges = len(hub.ranges)
    run = deploy_weights(inventory(tmp_path, [host]), settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(spec and spec.startswith("bytes=2097152-") for _, spec in hub.ranges[ranges:]), hub.ranges[ranges:]
    assert complete(host, cfg)


@pytest.mark.parametrize(
    ("mode", "kind"), [("not_found", "not found"), ("rate_limited", "rate limited"), ("unauthorized", "bad token")]
)
def test_a_refusing_hub_is_named_with_what_to_do(first_run, host, hub, settings, cfg, tmp_path, mode, kind):
    forget(host, cfg)
    hub.mode = mode
    try:
        run = deploy_weights(inventory(tmp_path, [host]), settings)
    finally:
        hub.mode = None
    assert run.returncode != 0
    assert f"modelscope download {REPO} failed: {kind}:" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not complete(host, cfg)


def test_a_revision_the_hub_does_not_have_is_not_taken_for_an_empty_model(first_run, host, settings, tmp_path):
    unknown = {**settings, "model_revision": "0bad" * 10}
    run = deploy_weights(inventory(tmp_path, [host]), unknown)
    assert run.returncode != 0
    assert f"modelscope download {REPO}@{'0bad' * 10} fetched no file: not found" in run.stderr
    assert not complete(host, resolve(unknown))

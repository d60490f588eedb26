"""Model weights on real fleet hosts: peer fan-out from one origin copy, idempotence, corruption,
an interrupted copy, a disk too small, the control node's push, and the unit's gate. (The fan-out
on hosts with links of their own: tests/fleet/test_fanout_links_fleet.py.)

The tests run in file order on one fleet: each step builds on the one before.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devfleet import localfleet
from glmfleet.config import resolve
from glmfleet.layout import model_dir as model_path
from glmfleet.layout import weights_check_argv as check_argv
from glmfleet.layout import weights_state_file as state_path
from tests.support.fleettools import TEST_DOUBLE, deploy
from tests.support.fleettools import fleet_host as remote
from tests.support.hub_mirror import file_sha256
from tests.support.pkgindex import PackageIndex, download_wheels
from tests.support.weights_fixtures import REPO_ID, SHARDS, deploy_weights, digests, inventory, shards

pytestmark = pytest.mark.fleet

HOSTS = 4
HF_CLI_VERSION = "2.4.0"


@pytest.fixture(scope="module")
def hosts(fleet):
    """The session's fleet grown to HOSTS hosts (taken down with it)."""
    localfleet.up(HOSTS)
    return [host["name"] for host in localfleet.load_hosts()][:HOSTS]


@pytest.fixture(scope="module")
def hub_cli_index(tmp_path_factory):
    """huggingface_hub and its dependencies, served on loopback, as a mirror-only site has them."""
    wheels = tmp_path_factory.mktemp("hub-cli-wheels")
    download_wheels([f"huggingface_hub=={HF_CLI_VERSION}"], wheels, dependencies=True)
    with PackageIndex(wheels) as index:
        yield index.url


@pytest.fixture(scope="module")
def settings(hub, hub_cli_index):
    return {
        "model": REPO_ID,
        "model_revision": hub.revision,
        "model_source": "peer",
        "hf_endpoint": hub.url,
        "hf_cli_version": HF_CLI_VERSION,
        "pip_index_url": hub_cli_index,
        "model_disk_margin_gb": 0.05,
        "model_progress_interval": 1,
    }


def modified(name: str, path: str) -> str:
    return remote(name).check_output(f"stat -c %y {path}")


def origin_digests(hub) -> dict[str, str]:
    return {shard.name: file_sha256(shard) for shard in hub.checkpoint.glob(SHARDS)}


def check(name: str, cfg) -> tuple[int, str]:
    """What the vLLM unit's ExecStartPre runs on the host."""
    result = remote(name).run(shlex.join(check_argv(cfg)))
    return result.rc, result.stderr


@pytest.fixture(scope="module")
def cfg(settings):
    return resolve(settings)


@pytest.fixture(scope="module")
def first_run(hosts, hub, settings, cfg, tmp_path_factory):
    for name in hosts:  # hosts kept from an earlier session may hold this model already
        remote(name).run_test(f"rm -rf {model_path(cfg)} {state_path(cfg)}")
    mark = hub.log_mark()
    run = deploy_weights(inventory(tmp_path_factory.mktemp("inv"), hosts), settings)
    assert run.returncode == 0, run.stderr[-4000:]
    return run, hub.downloads_since(mark)


def test_fanout_reads_one_copy_from_the_origin_and_every_host_verifies(first_run, hosts, hub, cfg):
    run, downloads = first_run
    # The whole fleet read each file from the origin exactly once.
    counts = collections.Counter(downloads)
    assert set(counts) == {p.name for p in hub.checkpoint.iterdir() if p.is_file()} | {".gitattributes"}
    assert set(counts.values()) == {1}
    # The seed (the first host) fetched from the origin; every host took part in one fan-out,
    # the others copying each file from whichever host held it.
    changed = run.changed()
    assert all("model weights | weights fan-out" in changed[name] for name in hosts)
    assert f"[{hosts[0]}] glmfleet-test/tiny-glm@{hub.revision[:12]}: the seed: fetching from the origin" in run.stderr
    assert not [line for line in run.stderr.splitlines() if "the seed" in line and not line.startswith(f"[{hosts[0]}]")]
    assert "fan-out: 4 of 4 hosts complete" in run.stderr
    for name in hosts:
        assert check(name, cfg)[0] == 0
        assert digests(name, model_path(cfg)) == origin_digests(hub)
    # The person running the deploy saw progress, not silence.
    assert "MB/s" in run.stderr and "complete, 12 files verified against the manifest (hub tree)" in run.stderr


def test_second_run_changes_nothing_hashes_nothing_and_reads_nothing(first_run, hosts, hub, settings, cfg, tmp_path):
    states = {name: modified(name, state_path(cfg)) for name in hosts}
    mark = hub.log_mark()
    run = deploy_weights(inventory(tmp_path, hosts), settings, debug=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert hub.downloads_since(mark) == []
    # One command per host: the fan-out read every host's weights from the hosts' own batches,
    # and a group with every copy complete sets up no transfer.
    commands = collections.Counter(re.findall(r"Running command on (\S+?):", run.stderr))
    assert commands == {name: 1 for name in hosts}, commands
    # The weights script did not even run: no host rewrote its state.
    assert {name: modified(name, state_path(cfg)) for name in hosts} == states


# While a fan-out runs, every member has the transfer key authorized and holds it, and takes part
# (a complete one gives): that, and withdrawing the key, is all that changes on a host that copies
# nothing.
KEY_STEPS = {
    "model weights | transfer key may read the model store's model files, for this fan-out",
    "model weights | transfer key withdrawn after the fan-out",
    "model weights | fleet transfer key",
    "model weights | peers' host keys",
    "model weights | weights fan-out",
}


def only_the_key_changed_beside(run, receivers: set[str]) -> bool:
    return all(ops <= KEY_STEPS for name, ops in run.changed().items() if name not in receivers)


def test_a_corrupted_shard_on_one_host_is_found_and_fetched_again_alone(first_run, hosts, hub, settings, cfg, tmp_path):
    victim_host = hosts[2]
    before = shards(victim_host, model_path(cfg))
    victim = sorted(before)[1]
    remote(victim_host).run_test(f"printf 'rot' | dd of={model_path(cfg)}/{victim} bs=1 seek=4096 conv=notrunc")
    mark = hub.log_mark()
    run = deploy_weights(inventory(tmp_path, hosts), settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert victim_host in run.changed() and only_the_key_changed_beside(run, {victim_host})
    assert f"{victim}: sha256 does not match the manifest; removed" in run.stderr
    # No other shard was written again; the victim's repair shows in its content (a new copy
    # may reuse the removed file's inode number, so the inode cannot tell).
    after = shards(victim_host, model_path(cfg))
    assert {n for n in before if n != victim and before[n] != after[n]} == set()
    assert digests(victim_host, model_path(cfg)) == origin_digests(hub)
    assert hub.downloads_since(mark) == []  # a peer gave it, not the origin


def test_an_interrupted_copy_resumes_and_is_never_served_half_done(first_run, hosts, hub, settings, cfg, tmp_path):
    receiver = hosts[3]
    remote(receiver).run_test(f"rm -rf {model_path(cfg)} {state_path(cfg)}")
    # A capped rate (a real setting) makes "midway" last long enough to be hit.
    process = deploy_weights(inventory(tmp_path, hosts), {**settings, "model_transfer_limit_mbps": 40}, background=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(shards(receiver, model_path(cfg))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    time.sleep(2)  # the host's rsync notices its closed session and keeps its partial file aside
    finished = shards(receiver, model_path(cfg))
    assert 2 <= len(finished) < 5, "the kill came too late to interrupt the copy"
    whole = origin_digests(hub)
    for name, digest in digests(receiver, model_path(cfg)).items():  # a file at its final path is whole
        assert digest == whole[name]
    rc, stderr = check(receiver, cfg)
    assert rc == 1 and "not complete" in stderr

    mark = hub.log_mark()
    run = deploy_weights(inventory(tmp_path, hosts), settings)
    assert run.returncode == 0, run.stderr[-3000:]
    assert receiver in run.changed() and only_the_key_changed_beside(run, {receiver})
    after = shards(receiver, model_path(cfg))
    assert {n for n in finished if after[n] != finished[n]} == set(), "finished shards were copied again"
    assert len(after) == 5 and check(receiver, cfg)[0] == 0
    assert hub.downloads_since(mark) == []


def test_a_disk_too_small_fails_before_any_transfer(first_run, hosts, settings, cfg, tmp_path):
    small = hosts[3]
    host = remote(small)
    parent = str(Path(model_path(cfg)).parent)
    host.run_test(f"rm -rf {model_path(cfg)} {state_path(cfg)} && mount -t tmpfs -o size=100m,mode=755 tmpfs {parent}")
    try:
        run = deploy_weights(inventory(tmp_path, hosts), {**settings, "model_disk_margin_gb": 0.1})
        assert run.returncode != 0
        assert "not enough disk for glmfleet-test/tiny-glm" in run.stderr and "Nothing was transferred" in run.stderr
        assert shards(small, model_path(cfg)) == {}
        # The others were complete and stayed untouched, but for the key of the fan-out that failed.
        assert only_the_key_changed_beside(run, set())
    finally:
        host.run_test(f"umount {parent}")


def test_the_control_node_pushes_its_copy(first_run, hosts, hub, settings, tmp_path):
    control_copy = tmp_path / "control-copy"
    subprocess.run(["cp", "-al", str(hub.checkpoint), str(control_copy)], check=True)  # same bytes, no second copy
    data = {
        **settings,
        "model_source": "control",
        "model_control_dir": str(control_copy),
        "model_dir": "/srv/models/tiny-glm",
    }
    cfg = resolve(data)
    two = hosts[:2]
    run = deploy_weights(inventory(tmp_path, two), data)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "files verified against the manifest (computed on the seed)" in run.stderr
    for name in two:
        assert check(name, cfg)[0] == 0
        assert digests(name, "/srv/models/tiny-glm") == origin_digests(hub)
    again = deploy_weights(inventory(tmp_path, two), data)
    assert again.returncode == 0 and again.changed() == {}


def test_vllm_starts_only_where_the_weights_are_complete(hosts, package_index, test_model, tmp_path):
    """The whole deploy: the unit's ExecStartPre refuses a copy that changed since it was
    verified; the next deploy fetches the file again and vLLM serves."""
    two = hosts[2:]  # hosts the vLLM deploy tests (tests/test_deploy_fleet.py) leave alone
    settings = {**TEST_DOUBLE, **test_model, "pip_index_url": package_index}
    first = deploy(inventory(tmp_path, two), data=settings)
    assert first.returncode == 0, first.stderr[-3000:]
    cfg = resolve(settings)
    broken, healthy = two
    host = remote(broken)
    victim = sorted(shards(broken, model_path(cfg)))[0]
    host.run_test(f"printf 'rot' | dd of={model_path(cfg)}/{victim} bs=1 seek=4096 conv=notrunc")
    assert host.run("systemctl restart vllm.service").rc != 0
    journal = host.check_output("journalctl --unit vllm.service --no-pager --lines 20")
    assert f"not complete (files changed since verified: {victim}); re-run the deploy" in journal
    assert not host.service("vllm").is_running

    healed = deploy(inventory(tmp_path, two), data=settings)
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert set(healed.changed()) == {broken}
    assert any(op.startswith("model weights | fetch") for op in healed.changed()[broken])
    assert host.service("vllm").is_running and check(broken, cfg)[0] == 0

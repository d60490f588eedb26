"""The fan-out on linked hosts (each its own network namespace, its link shaped with tc): a link
cut mid-transfer, a slow host, a peer that gives a corrupted file. Each ends with every host's
copy verified, one copy read from the origin at most, and no file at its place on a receiver that
was not whole and right (a watcher hashes each one as it appears).

The tests run in file order on one set of linked hosts: each step builds on the one before.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from devfleet import localfleet
from glmfleet import shell
from glmfleet.config import resolve
from glmfleet.layout import model_dir as model_path
from glmfleet.layout import model_incoming_dir, weights_check_argv, weights_state_file
from tests.support.fleettools import fleet_host as remote
from tests.support.weights_fixtures import deploy_weights, digests, inventory, shards

pytestmark = pytest.mark.fleet

HOSTS = 4
RATE_MBIT = 16  # 2 MB/s: a shard takes a second, long enough to cut a link in the middle of one
SLOW_MBIT = 6
SHARDS = 12
SHARD_BYTES = 2 * 10**6


@pytest.fixture(scope="module")
def hosts(fleet):
    """HOSTS linked hosts beside the session's shared ones, stopped at the end (the shared ones'
    tests list every host that is up)."""
    names = [h["name"] for h in localfleet.up(HOSTS, links=True) if h["network"] == "linked"][:HOSTS]
    for name in names:
        localfleet.shape(name, rate_mbit=RATE_MBIT)
    yield names
    for name in names:
        localfleet.stop_host(name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """SHARDS shards of random bytes and a config: the fan-out moves files, whatever is in them
    (the smallest real checkpoint, tests/support/model_maker.py, is 97 MB)."""
    directory = tmp_path_factory.mktemp("linked") / "checkpoint"
    directory.mkdir()
    generator = random.Random(25)
    (directory / "config.json").write_text('{"architectures": ["Glm4ForCausalLM"]}\n')
    for number in range(1, SHARDS + 1):
        (directory / f"model-{number:05d}-of-{SHARDS:05d}.safetensors").write_bytes(generator.randbytes(SHARD_BYTES))
    return directory


@pytest.fixture(scope="module")
def settings(checkpoint):
    return {
        "model": "glmfleet-test/linked",
        "model_revision": "11ed" * 10,
        "model_source": "peer",
        "model_peer_seed": "control",
        "model_control_dir": str(checkpoint),
        "model_disk_margin_gb": 0.01,
        "model_progress_interval": 2,
    }


@pytest.fixture(scope="module")
def cfg(settings):
    return resolve(settings)


def origin_digests(checkpoint: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.glob("model-*.safetensors")}


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())


def bare(names: list[str], cfg) -> None:
    for name in names:
        remote(name).run_test(shell.join(["rm", "-rf", model_path(cfg), weights_state_file(cfg)]))


def complete(name: str, cfg) -> bool:
    return remote(name).run(shell.join(weights_check_argv(cfg))).rc == 0


class Watcher:
    """While a deploy runs, hashes every shard that appears at its place on the receivers, and
    asks each receiver's vLLM gate (the weights check) whether it would start: nothing may be
    wrong, nor complete before every shard is there. One kept SSH connection per host; a host
    whose link is cut is asked again once it answers."""

    def __init__(self, names: list[str], cfg, expected: dict[str, str], sockets: Path):
        self.names, self.cfg, self.expected, self.sockets = names, cfg, expected, sockets
        self.seen: set[tuple[str, str, int]] = set()
        self.wrong: list[str] = []
        self.early: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def ssh(self, name: str, command: str) -> subprocess.CompletedProcess:
        *options, target = localfleet.ssh_argv(next(h for h in localfleet.load_hosts() if h["name"] == name))
        kept = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.sockets}/%C", "-o", "ControlPersist=30"]
        try:
            return subprocess.run([*options, *kept, target, command], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 255, "", "timed out")

    def look(self, name: str) -> None:
        directory = model_path(self.cfg)
        # The gate first: a copy it calls complete must already have every file in place.
        answer = self.ssh(
            name,
            f"{shell.join(weights_check_argv(self.cfg))} >/dev/null 2>&1 && echo complete; echo ::; "
            f"find {shell.quote(directory)} -maxdepth 1 -name 'model-*.safetensors' -printf '%f %i\\n'",
        )
        if answer.returncode != 0:
            return  # its link is cut
        gate, _, listing = answer.stdout.partition("::")
        found = {line.split()[0]: int(line.split()[1]) for line in listing.splitlines() if line.strip()}
        new = {(name, shard, inode) for shard, inode in found.items()} - self.seen
        if new:
            hashed = self.ssh(
                name, f"cd {shell.quote(directory)} && {shell.join(['sha256sum', *(shard for _, shard, _ in new)])}"
            )
            if hashed.returncode != 0:
                return
            got = {line.split()[1]: line.split()[0] for line in hashed.stdout.splitlines()}
            self.wrong += [f"{name}:{shard}" for shard, digest in got.items() if digest != self.expected[shard]]
            self.seen |= new
        if "complete" in gate and len(found) < len(self.expected):
            self.early.append(f"{name}: complete with {len(found)} shards")

    def watch(self):
        while not self.stopping.wait(0.5):
            for name in self.names:
                self.look(name)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()
        for name in self.names:
            self.look(name)  # the last files


def fan_out(hosts, settings, cfg, tmp_path, receivers, during=None):
    """One deploy of the weights role to every host, watched; returns its output and the bytes
    the control node sent onto the fleet's bridge meanwhile."""
    expected = origin_digests(Path(settings["model_control_dir"]))
    sent = localfleet.bridge_bytes()["sent"]
    sockets = Path(tempfile.mkdtemp(prefix="watch-", dir="/tmp"))  # short: a socket's path has 108 bytes
    with Watcher(receivers, cfg, expected, sockets) as watcher:
        process = deploy_weights(inventory(tmp_path, hosts), settings, background=True)
        if during:
            during()
        _stdout, stderr = process.communicate(timeout=600)
    output = stderr.decode()
    (tmp_path / "deploy.log").write_text(output)
    assert process.returncode == 0, output[-4000:]
    assert watcher.wrong == [] and watcher.early == []
    assert len(watcher.seen) == len(receivers) * len(expected), "the watcher missed files"
    for name in hosts:
        assert complete(name, cfg)
        assert digests(name, model_path(cfg)) == expected
    return output, localfleet.bridge_bytes()["sent"] - sent


def test_a_link_cut_mid_transfer_is_ridden_out_and_the_copy_resumes(hosts, settings, cfg, tmp_path):
    bare(hosts, cfg)
    cut = hosts[2]

    def cut_while_it_receives():
        """Once it holds a shard and has part of another staged: a cut in the middle of a copy."""
        deadline, incoming = time.monotonic() + 300, model_incoming_dir(cfg)
        part = f"find {shell.quote(incoming)} -type f -size +100k 2>/dev/null | grep -q ."
        while not (shards(cut, model_path(cfg)) and remote(cut).run(part).rc == 0):
            assert time.monotonic() < deadline, f"{cut} received nothing"
            time.sleep(0.1)
        localfleet.set_link(cut, False)
        time.sleep(25)  # longer than a copy waits on a silent peer (PEER_ALIVE_INTERVAL_S x PEER_ALIVE_COUNT)
        localfleet.set_link(cut, True)

    output, sent = fan_out(hosts, settings, cfg, tmp_path, hosts[1:], during=cut_while_it_receives)
    size = checkpoint_bytes(Path(settings["model_control_dir"]))
    assert size < sent < 1.5 * size  # the seed's copy from the control node, once
    assert "failed (" in output  # copies to or from the cut host failed and were asked of another peer
    assert f"[{cut}] " in output and "resuming after" in output


def test_a_slow_host_ends_verified_and_the_others_do_not_wait_for_it(hosts, settings, cfg, tmp_path):
    bare(hosts, cfg)
    slow = hosts[3]
    localfleet.shape(slow, rate_mbit=SLOW_MBIT)
    try:
        output, sent = fan_out(hosts, settings, cfg, tmp_path, hosts[1:])
    finally:
        localfleet.shape(slow, rate_mbit=RATE_MBIT)
    assert sent < 1.5 * checkpoint_bytes(Path(settings["model_control_dir"]))
    # The fast hosts completed before the slow one: their parts said so first.
    order = [line.split("]")[0][1:] for line in output.splitlines() if ": complete, " in line]
    assert order[-1] == slow, order


def test_a_peer_that_gives_a_corrupted_file_is_refused_and_heals(hosts, settings, cfg, tmp_path):
    """The rotten peer's disk changed the bytes but not the files' stat (as bits rot), so it
    still counts its copy verified: the receivers' hashes find it out."""
    rotten, good = hosts[0], hosts[1]
    directory = model_path(cfg)
    remote(rotten).run_test(
        f"for f in {shell.quote(directory)}/model-*.safetensors; do printf 'rot' | dd of=$f bs=1 seek=4096 conv=notrunc; done"
    )
    # The state file records the rotten files' new stat, as if verified: bit rot changes no stat.
    script = (
        "import json, os, sys; d, s = sys.argv[1:]; state = json.load(open(s)); "
        "state['verified'] = {p: [os.stat(f'{d}/{p}').st_size, os.stat(f'{d}/{p}').st_mtime_ns, "
        "os.stat(f'{d}/{p}').st_ctime_ns, os.stat(f'{d}/{p}').st_ino] for p in state['verified']}; "
        "json.dump(state, open(s, 'w'))"
    )
    remote(rotten).run_test(shell.join(["python3", "-c", script, directory, weights_state_file(cfg)]))
    assert complete(rotten, cfg) and complete(good, cfg)
    bare(hosts[2:], cfg)
    output, sent = fan_out(hosts, settings, cfg, tmp_path, hosts[2:])
    assert f"from {rotten} did not match the manifest: {rotten} hashes its copy again" in output
    assert f"[{rotten}] " in output and "does not match the manifest on a recheck; removed" in output
    assert sent < 0.5 * checkpoint_bytes(Path(settings["model_control_dir"]))  # nothing from the origin

    again = deploy_weights(inventory(tmp_path, hosts), settings)
    assert again.returncode == 0 and again.changed() == {}

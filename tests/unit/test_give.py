"""``glmfleet-weights give``, the transfer key's only command, run as sshd runs it (the request in
$SSH_ORIGINAL_COMMAND, the file on standard output) over real files: what it hands on while the
file still arrives, what it refuses, and the receiving side's cap. The fan-out's fleet tests run
it between real hosts (tests/fleet/test_fanout_links_fleet.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from glmfleet.config import resolve
from glmfleet.facts.output import host_script
from glmfleet.layout import model_dir, model_incoming_dir
from tests.support.weights_fixtures import SCRIPT

weights = host_script("glmfleet_weights")
MODEL = "org--model/" + "ab" * 20
SIZE = 3 * 2**20


@pytest.fixture
def store(tmp_path) -> Path:
    """A model store with one model directory and its manifest (the bytes: SIZE of a pattern)."""
    directory = tmp_path / "store" / MODEL
    (directory / ".glmfleet" / "incoming").mkdir(parents=True)
    manifest = {"revision": "ab" * 20, "files": {"model.safetensors": {"size": SIZE, "sha256": "0" * 64}}}
    (directory / ".glmfleet" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "store"


def content(size: int = SIZE) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def give(store: Path, request, **popen) -> subprocess.Popen:
    text = request if isinstance(request, str) else json.dumps(request)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "give", "--store", str(store)],
        env={**os.environ, "SSH_ORIGINAL_COMMAND": text},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def asked(path: str = "model.safetensors", offset: int = 0, directory: str = MODEL) -> dict:
    return {"dir": directory, "path": path, "offset": offset}


def test_a_whole_file_is_given_from_an_offset(store):
    (store / MODEL / "model.safetensors").write_bytes(content())
    out, err = give(store, asked(offset=1000)).communicate(timeout=30)
    assert out == content()[1000:], err


def test_a_file_still_arriving_is_handed_on_as_it_lands_and_to_its_end_once_verified(store):
    staged = store / MODEL / ".glmfleet" / "incoming" / "model.safetensors"
    data, piece = content(), SIZE // 6

    def arrive():  # as a copy from a peer lands: appended, then moved to its place once hashed
        with open(staged, "wb", buffering=0) as f:
            for start in range(0, SIZE, piece):
                f.write(data[start : start + piece])
                time.sleep(0.2)
        os.replace(staged, store / MODEL / "model.safetensors")

    staged.write_bytes(b"")
    writer = threading.Thread(target=arrive)
    process = give(store, asked())
    writer.start()
    first = process.stdout.read(piece)  # handed on before the file is whole
    assert writer.is_alive() and first == data[:piece]
    rest, err = process.communicate(timeout=30)
    writer.join()
    assert process.returncode == 0 and first + rest == data, err


def test_a_copy_removed_while_given_tells_the_receiver_to_drop_what_it_got(store):
    staged = store / MODEL / ".glmfleet" / "incoming" / "model.safetensors"
    staged.write_bytes(content(SIZE // 3))
    process = give(store, asked())
    assert process.stdout.read(SIZE // 3) == content(SIZE // 3)
    staged.unlink()  # it did not match the manifest here
    _out, err = process.communicate(timeout=30)
    assert process.returncode == weights.GIVE_DROPPED, err
    assert b"did not match the manifest and was removed" in err


@pytest.mark.parametrize(
    "request_, why",
    [
        ("rsync --server --sender -e.LsfxC . /etc/shadow", "not a request"),
        (asked(path="../../../etc/passwd"), "not a model file"),
        (asked(path=".glmfleet/manifest.json"), "not a model file"),
        (asked(directory="org--model/../org--model/" + "ab" * 20), "not a model file"),
        (asked(directory="/" + MODEL), "not a plain relative path"),
        (asked(directory=".ssh"), "not a model file"),
        (asked(path="tokenizer.json"), "is not in the manifest"),
        (asked(offset=SIZE + 1), "is not in the manifest"),
        (asked(offset=-1), "offset (a number >= 0)"),
        ({**asked(), "offset": "0; id"}, "offset (a number >= 0)"),
    ],
)
def test_what_is_not_a_model_file_of_the_store_is_refused(store, request_, why):
    (store / MODEL / "model.safetensors").write_bytes(content())
    out, err = give(store, request_).communicate(timeout=30)
    assert out == b""
    assert why.encode() in err, err


def test_no_link_in_the_store_is_followed(store, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's")
    (store / MODEL / "model.safetensors").symlink_to(secret)
    out, err = give(store, asked()).communicate(timeout=30)
    assert out == b"" and b"Too many levels of symbolic links" in err
    # A directory swapped for a link, whose manifest names what the link reaches.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / ".glmfleet").mkdir(parents=True)
    (elsewhere / ".glmfleet" / "manifest.json").write_text(
        json.dumps({"revision": "x", "files": {"secret": {"size": 6}}})
    )
    (elsewhere / "secret").symlink_to(secret)
    (store / "planted").symlink_to(elsewhere)
    out, err = give(store, asked(path="secret", directory="planted")).communicate(timeout=30)
    assert out == b"" and b"Not a directory" in err


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(store):
    os.mkfifo(store / MODEL / "model.safetensors")
    out, err = give(store, asked()).communicate(timeout=30)
    assert out == b"" and b"is not a regular file" in err


def test_a_receiver_keeps_to_the_transfer_limit(tmp_path):
    """``receive`` paces its reads: 2 MB at 1 MB/s cannot end in less than about a second."""
    source = tmp_path / "source"
    source.write_bytes(content(2 * 10**6))
    started = time.monotonic()
    with open(source, "rb") as stream:
        have = weights.receive(stream, tmp_path / "staged", 0, 2 * 10**6, 10**6, weights.Reading())
    assert have == 2 * 10**6 and (tmp_path / "staged").read_bytes() == source.read_bytes()
    assert time.monotonic() - started >= 1.0


# Two copies in one host's part, each fed by a peer at 1 MB/s: run in a child interpreter, since
# threads blocked in os.read would hold each other up under gevent, which pyinfra's CLI patches
# into this test process.
TWO_COPIES = """
import importlib.util, json, os, sys, threading, time
spec = importlib.util.spec_from_file_location("weights", sys.argv[1])
weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(weights)
reading, events, size, piece = weights.Reading(), {}, 2 * 10**6, 50_000

def peer(out):
    with os.fdopen(out, "wb", buffering=0) as stream:
        for _ in range(size // piece):
            stream.write(bytes(piece))
            time.sleep(piece / 10**6)

def copy(name):
    with reading.place() as ticket:
        while not reading.due(ticket):
            time.sleep(0.01)
        events[name + " opens"] = time.monotonic()
        given, taken = os.pipe()
        threading.Thread(target=peer, args=(taken,)).start()
        with reading.turn(ticket, size, 0), os.fdopen(given, "rb") as stream:
            events[name + " read"] = time.monotonic()
            weights.receive(stream, sys.argv[2] + "/" + name, 0, size, None, reading)
        events[name + " done"] = time.monotonic()

threads = [threading.Thread(target=copy, args=(name,)) for name in ("first", "second")]
for thread in threads:
    thread.start()
    time.sleep(0.05)
for thread in threads:
    thread.join()
print(json.dumps(events))
"""


def test_copies_are_read_in_turn_and_the_next_opens_near_the_end_of_the_one_read(tmp_path):
    """Two copies asked for one after the other: the second is read once the first has been,
    and opens its session once the first has about NEXT_COPY_LEAD_S left at its pace (2 MB
    arriving at 1 MB/s here: not at once, not only at the end)."""
    child = subprocess.run(
        [sys.executable, "-c", TWO_COPIES, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    at = json.loads(child.stdout)
    assert at["second read"] >= at["first done"], "two copies were read at once"
    lead = at["first done"] - at["second opens"]
    assert weights.NEXT_COPY_LEAD_S - 0.3 <= lead <= weights.NEXT_COPY_LEAD_S + 0.1, f"opened {lead:.2f} s before"


def test_the_control_node_pushes_a_seed_into_the_staging_directory_the_host_script_reads():
    cfg = resolve({"model_revision": "ab" * 20, "model_source": "peer"})
    assert model_incoming_dir(cfg) == f"{model_dir(cfg)}/{weights.INCOMING}"

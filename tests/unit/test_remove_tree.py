"""The local fleet removes a host's tree from a process that pyinfra has patched with gevent (the
test session's own) without a file descriptor held open per directory: shutil.rmtree there held
one per directory until it ended, and a host's tree ran the session out of them (issue 18)."""

from __future__ import annotations

import os

import pyinfra_cli  # noqa: F401  (patches this process with gevent, as pyinfra's CLI does)
from gevent import get_hub

from devfleet.localfleet import remove_tree


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_tree_of_many_directories_is_removed_with_no_descriptor_left_open(tmp_path):
    tree = tmp_path / "upper"
    for n in range(2000):
        (tree / f"d{n}" / "lib").mkdir(parents=True)
        (tree / f"d{n}" / "lib" / "f").write_text("x")
    get_hub()  # in use, as after any pyinfra run or subprocess in this process
    before = open_descriptors()
    remove_tree(tree)
    assert not tree.exists()
    assert open_descriptors() - before < 10

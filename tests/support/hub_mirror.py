"""A real Hugging Face mirror on loopback: olah serving a local git repository.

olah (PyPI) serves repositories under its ``mirrors-path`` as ``<type>/<org>/<name>`` git
repositories, large files as git-lfs pointers with their objects in ``.git/lfs/objects``: the
layout git-lfs itself writes. ``publish`` lays a checkpoint out that way (weights as LFS, small
files as plain git blobs, as on the hub); ``OlahServer`` runs olah offline, so it never asks the
real hub, and the real ``hf`` CLI downloads from it through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "glmfleet tests",
        "GIT_AUTHOR_EMAIL": "tests@glmfleet.invalid",
        "GIT_COMMITTER_NAME": "glmfleet tests",
        "GIT_COMMITTER_EMAIL": "tests@glmfleet.invalid",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def publish(checkpoint: Path, mirrors_root: Path, repo_id: str, message: str = "upload") -> str:
    """Commit ``checkpoint``'s files to the mirror repository ``repo_id``; returns the commit id.

    LFS objects are hard-linked where possible (same filesystem), so a multi-GB model is not
    copied again. Publishing again adds a commit on top (a new revision)."""
    repo = mirrors_root / "models" / repo_id
    if not (repo / ".git").exists():
        repo.mkdir(parents=True)
        git(repo, "init", "--quiet", "--initial-branch=main")
        (repo / ".gitattributes").write_text(
            "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
        )
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or ".cache" in path.parts:
            continue
        relative = path.relative_to(checkpoint)
        target = repo / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in LFS_SUFFIXES:
            oid = file_sha256(path)
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            if not obj.exists():
                try:
                    os.link(path, obj)
                except OSError:
                    shutil.copyfile(path, obj)
            target.write_text(
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {path.stat().st_size}\n"
            )
        else:
            shutil.copyfile(path, target)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OlahServer:
    """``olah-cli`` on 127.0.0.1, offline, serving the repositories under ``mirrors_root``."""

    def __init__(self, mirrors_root: Path, workdir: Path, port: int | None = None):
        self.mirrors_root = mirrors_root
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> OlahServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "olah.toml"
        # offline: never ask the upstream hub; hf-netloc points at a closed loopback port all the same.
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.workdir / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors_root}"]\n'
            'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "[accessibility]\noffline = true\n"
        )
        olah = Path(sys.executable).with_name("olah-cli")
        self.log = open(self.workdir / "olah.log", "ab")
        self.process = subprocess.Popen(
            [str(olah), "-c", str(config)], cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited {self.process.returncode}; see {self.workdir / 'olah.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("olah did not listen within 60 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> OlahServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

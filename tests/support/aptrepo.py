"""A real, signed apt repository served on loopback, standing in for NVIDIA's and Docker's
repositories (which the tests may not reach): packages built with dpkg-deb, indexed with
dpkg-scanpackages, a Release signed by a throwaway gpg key, served by a thread on 127.0.0.1.
The fleet's hosts share the machine's network, so they reach it as a site reaches its mirror."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Package:
    """A package to build: its control fields and its files (path on the host -> text)."""

    name: str
    version: str
    depends: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    description: str = "built by glmfleet's tests for a loopback repository"


def build_deb(package: Package, out_dir: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"deb-{package.name}-"))
    (root / "DEBIAN").mkdir()
    control = [
        f"Package: {package.name}",
        f"Version: {package.version}",
        "Architecture: all",
        "Maintainer: glmfleet tests <tests@glmfleet.invalid>",
        f"Description: {package.description}",
    ]
    if package.depends:
        control.append(f"Depends: {', '.join(package.depends)}")
    (root / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
    for path, text in package.files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    deb = out_dir / f"{package.name}_{package.version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


class SigningKey:
    """A throwaway ed25519 key in its own gpg home; public half exported ASCII-armored."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(mode=0o700, parents=True)
        self.gpg(["--quick-generate-key", "--passphrase", "", "glmfleet test repository", "ed25519", "sign", "never"])
        self.armored = self.gpg(["--armor", "--export"]).stdout

    def gpg(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--pinentry-mode", "loopback", *args],
            check=True,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def clearsign(self, path: Path, out: Path) -> None:
        self.gpg(["--yes", "--clearsign", "--output", str(out), str(path)])


def publish_flat(directory: Path, packages: list[Package], key: SigningKey, key_name: str = "key.asc") -> None:
    """A flat repository (``deb URL /``, as NVIDIA's are) in directory, with its key beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    for package in packages:
        build_deb(package, directory)
    index = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."], cwd=directory, check=True, capture_output=True, text=True
    ).stdout
    (directory / "Packages").write_text(index)
    data = index.encode()
    (directory / "Release").write_text(
        "Origin: glmfleet tests\nLabel: glmfleet tests\nDate: Sun, 22 Nov 2026 00:00:00 UTC\n"
        f"SHA256:\n {hashlib.sha256(data).hexdigest()} {len(data)} Packages\n"
    )
    key.clearsign(directory / "Release", directory / "InRelease")
    (directory / key_name).write_text(key.armored)


class LoopbackServer:
    """Serve a directory over HTTP on 127.0.0.1 (a free port) from a thread, as a context manager."""

    def __init__(self, directory: Path):
        handler = functools.partial(QuietHandler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

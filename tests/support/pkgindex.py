"""A real package index on loopback, for glmfleet's tests and `make demo`.

Test hosts install "vLLM" (the test double in tests/support/vllm_test_double) and
bootstrap uv from a package index, as production hosts do from PyPI or a
mirror. This module fills a directory with those wheels and serves it with
pypiserver on 127.0.0.1. The local fleet's hosts share this machine's network
namespace, so the index URL works from inside them too.

    fill_index_dir(wheels_dir, requirements=["uv==0.13.9"])
    with PackageIndex(wheels_dir) as index:
        index.url   # http://127.0.0.1:PORT/simple/

Needs: uv, beside this Python or on PATH (it builds the double's wheel), and pypiserver in this
interpreter (which brings pip, used to download wheels).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

TEST_DOUBLE_SOURCE = Path(__file__).resolve().parent / "vllm_test_double"
TEST_DOUBLE_VERSION = tomllib.loads((TEST_DOUBLE_SOURCE / "pyproject.toml").read_text())["project"]["version"]

# pypiserver is started through this shim so that it dies with the process
# that started it (PR_SET_PDEATHSIG), even when that process is killed
# outright and its teardown never runs. Done in the child rather than in a
# preexec_fn, which is unsafe once the parent has threads. The signal follows
# the starting *thread*, so call start() from one that outlives the index.
_PYPISERVER_SHIM = """\
import ctypes, os, runpy, signal, sys
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
if os.getppid() != int(sys.argv.pop(1)):
    sys.exit("pypiserver: the process that started it is gone")
runpy.run_module("pypiserver", run_name="__main__", alter_sys=True)
"""
_PORT_ATTEMPTS = 3
# Loopback must never go through an HTTP proxy from the environment.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def build_test_double_wheel(directory: Path) -> Path:
    """Build the vllm-test-double wheel into directory; return its path.

    Built with `uv build`, not `python -m build`: the tests need uv anyway (the
    product bootstraps it, the tests make venvs with it), so this adds no
    dependency, and uv fetches the build backend (hatchling) itself.
    A wheel of the same name already there is replaced.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vllm-test-double-build-") as out:
        _run([uv_command(), "build", "--wheel", "--out-dir", out, str(TEST_DOUBLE_SOURCE)])
        (wheel,) = Path(out).glob("*.whl")
        return Path(shutil.move(wheel, directory / wheel.name))


def download_wheels(requirements: Iterable[str], directory: Path, dependencies: bool = False) -> list[Path]:
    """Download a wheel for each requirement (e.g. "uv==0.13.9") into directory, and with
    ``dependencies`` every wheel they need.

    Wheels only, for this machine's platform -- the local fleet's hosts run on it. pip reads
    its usual configuration, so a mirror configured for pip is used; with none, wheels come
    from PyPI.
    """
    requirements = list(requirements)
    directory.mkdir(parents=True, exist_ok=True)
    if not requirements:
        return []
    with tempfile.TemporaryDirectory(prefix="pkgindex-download-", dir=directory.parent) as out:
        only = [] if dependencies else ["--no-deps"]
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                *only,
                "--only-binary=:all:",
                "--dest",
                out,
                *requirements,
            ]
        )
        return [Path(shutil.move(wheel, directory / wheel.name)) for wheel in sorted(Path(out).glob("*.whl"))]


def fill_index_dir(
    directory: Path, *, extra_wheels: Iterable[Path] = (), requirements: Iterable[str] = ()
) -> list[Path]:
    """Put the test double's wheel, copies of extra_wheels and downloads of requirements into directory."""
    wheels = [build_test_double_wheel(directory)]
    for wheel in extra_wheels:
        wheels.append(Path(shutil.copy2(wheel, directory)))
    wheels += download_wheels(requirements, directory)
    return wheels


class PackageIndex:
    """pypiserver serving one directory on loopback.

    start() returns the PEP 503 simple-index URL once the server answers;
    stop() ends the server and waits for it. Also a context manager. The
    index never falls back to PyPI, so a wheel missing from the directory
    is an install error rather than a silent download from elsewhere.
    """

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", startup_timeout_s: float = 20.0):
        self.directory = Path(directory)
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the package index is not running")
        return f"http://{self.host}:{self.port}/simple/"

    @property
    def log_path(self) -> Path:
        """pypiserver's output (one line per request); removed by stop()."""
        if self._log is None:
            raise RuntimeError("the package index is not running")
        return Path(self._log.name)

    def start(self) -> str:
        if self._process is not None:
            raise RuntimeError("the package index is already running")
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no such directory to serve: {self.directory}")
        # The free port is probed, then bound by pypiserver; another process
        # may take it in between, so a bind failure gets a fresh port.
        for _ in range(_PORT_ATTEMPTS):
            output = self._try_start(_free_port(self.host))
            if output is None:
                return self.url
            if "Address already in use" not in output:
                raise RuntimeError(f"pypiserver failed to start:\n{output}")
        raise RuntimeError(f"pypiserver found no free port on {self.host} in {_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None
        self.port = None

    def __enter__(self) -> "PackageIndex":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _try_start(self, port: int) -> str | None:
        """Start pypiserver on port and wait until it answers; None on success, else its output."""
        # Kept open while pypiserver runs; stop() closes and removes it.
        self._log = tempfile.NamedTemporaryFile(prefix="pypiserver-", suffix=".log", delete=False)  # noqa: SIM115
        command = [
            sys.executable, "-c", _PYPISERVER_SHIM, str(os.getpid()),
            "run",
            "--host", self.host,
            "--port", str(port),
            "--disable-fallback",
            # No authentication: the index is read-only test scaffolding on loopback.
            "--authenticate", ".", "--passwords", ".",
            # Explicit, so an installed waitress or gunicorn does not change the server.
            "--server", "wsgiref",
            "-v",
            str(self.directory),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while self._process.poll() is None:
            if _answers(f"http://{self.host}:{port}/health"):
                self.port = port
                return None
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"pypiserver did not answer on {self.host}:{port} within {self.startup_timeout_s}s")
            time.sleep(0.05)
        output = Path(self._log.name).read_text(errors="replace")
        self.stop()
        return output


def _answers(url: str) -> bool:
    try:
        with _direct.open(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def uv_command() -> str:
    """The uv installed beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    uv = str(beside) if beside.exists() else shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is neither beside this Python nor on PATH: run `make venv`")
    return uv


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

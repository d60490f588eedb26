"""A real browser for the pages people look at: headless Chromium (Debian's ``chromium``, which
``make fleet-deps`` installs) loads a page on loopback, runs its scripts, then writes a
screenshot of it, or the DOM as the scripts left it."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

WINDOW = "1400,900"
# Virtual time the page's scripts get (its queries to Prometheus, the graph's drawing) before
# the browser writes what it shows.
SCRIPT_TIME_MS = 8000


def chromium_command() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("headless Chromium is missing: `make fleet-deps` installs Debian's chromium")
    return found


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    if not ipaddress.ip_address(urlsplit(url).hostname).is_loopback:
        raise ValueError(f"{url}: the browser only ever loads pages on loopback")
    with tempfile.TemporaryDirectory(prefix="glmfleet-chromium-") as profile:
        return subprocess.run(
            [
                chromium_command(),
                "--headless",
                # Root runs the tests: Chromium's sandbox refuses root.
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW}",
                f"--virtual-time-budget={SCRIPT_TIME_MS}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )


def screenshot(url: str, path: Path) -> Path:
    """The page as a person sees it, as a PNG at ``path``."""
    chromium(url, f"--screenshot={path}")
    if not path.exists() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"Chromium wrote no screenshot of {url} to {path}")
    return path


def rendered_dom(url: str) -> str:
    """The page's DOM once its scripts have run (what the screenshot shows, as HTML)."""
    return chromium(url, "--dump-dom").stdout

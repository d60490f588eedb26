"""`make demo`: bring up the local fleet and run glmfleet's real deploy against it, twice.

The local hosts have no GPU, so they serve through the vLLM TEST DOUBLE, installed by the
product's own venv role from a package index this demo serves on loopback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
import tempfile
from pathlib import Path

from devfleet import localfleet
from glmfleet.config import resolve
from roles.verify import verify_argv
from tests.support.fleettools import API_KEY_ENV, TEST_DOUBLE, UV_VERSION, deploy, fleet_host, test_model_settings
from tests.support.pkgindex import PackageIndex, fill_index_dir

BANNER = """\
==> glmfleet demo: {hosts} local Debian hosts (systemd-nspawn, SSH on 127.0.0.1)
    These hosts have NO GPU: vLLM is replaced by a TEST DOUBLE (package vllm-test-double),
    an OpenAI-compatible server that serves no model. Everything else is the real deploy.
"""


def say(text: str) -> None:
    print(text, flush=True)


def host_report(name: str, settings: dict) -> str:
    """The host's unit state and venv, and the verify role's own check, run once on the host."""
    cfg = resolve({**settings, **dict(localfleet.inventory_hosts())[name]}, name)
    host = fleet_host(name)
    venv = host.file(f"{cfg.vllm_venv_root}/current").linked_to.rsplit("/", 1)[-1]
    state = host.check_output("systemctl is-active vllm.service")
    probe = host.run(shlex.join([*verify_argv(cfg), "--deadline", "0"]))
    return f"    {name}: vllm.service {state}, venv {venv}\n      {probe.stdout.strip()}"


def demo_api_key() -> str:
    """The demo fleet's API key: made once, kept root-only beside the fleet's state, so that
    `make demo` again finds the fleet converged and restarts nothing."""
    path = localfleet.fleet_dir() / "demo-api-key"
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as key:
            key.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    args = parser.parse_args()

    say(BANNER.format(hosts=args.hosts))
    say("==> bringing up the local fleet (the first time builds a Debian root filesystem)")
    localfleet.up(args.hosts)
    names = [host["name"] for host in localfleet.load_hosts()][: args.hosts]
    env = {API_KEY_ENV: demo_api_key()}

    with (
        tempfile.TemporaryDirectory(prefix="glmfleet-demo-index-") as wheels,
        tempfile.TemporaryDirectory(prefix="glmfleet-demo-model-") as model,
    ):
        fill_index_dir(Path(wheels), requirements=[f"uv=={UV_VERSION}"])
        with PackageIndex(Path(wheels)) as index:
            # The weights: a small real checkpoint the control node pushes to every host.
            settings = {**TEST_DOUBLE, **test_model_settings(Path(model) / "checkpoint"), "pip_index_url": index.url}
            say(f"==> pyinfra inventory/local.py deploy.py (package index {index.url})")
            first = deploy(data=settings, env=env)
            if first.returncode != 0:
                say(first.stderr[-4000:])
                say("==> the deploy FAILED")
                return 1
            changed = first.changed()
            say("    changed: " + ", ".join(f"{name} ({len(changed.get(name, ()))} operations)" for name in names))
            say("==> the same deploy again: a converged fleet must change nothing")
            second = deploy(data=settings, env=env)
            if second.returncode != 0 or second.changed():
                say(second.stderr[-4000:])
                say(f"==> the second run changed {second.changed()}: NOT idempotent")
                return 1
            say("    no host changed")

    say("==> each host, verified with a real request (served by the test double):")
    for name in names:
        say(host_report(name, settings))
    say("==> done: every demo host verified. `make fleet-down` stops the fleet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

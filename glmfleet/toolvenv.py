"""Small pinned command-line tools on hosts, each in its own venv under /opt/glmfleet.

uv (which builds vLLM's venv) and the hub CLIs (hf, modelscope) are installed the same way:
the host's python3 makes a venv named after the package and version, pip installs the one
pinned package into it, and the presence of its command says it is done, so a converged host
runs nothing.

pip itself is not installed into the venv: it runs from the wheel the interpreter's ensurepip
would have installed (pip supports ``python pip-*.whl/pip install``). Installing pip (and, for
Python 3.11, setuptools) into a venv compiles some two thousand files: measured on a local fleet
host (Debian 12, Python 3.11), ``python3 -m venv`` took 5.6 s of CPU of the 7.3 s that installing
uv did; without it, 3.1 s.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, server

from glmfleet.facts import ask

TOOLS_ROOT = "/opt/glmfleet"
# The pip wheel the interpreter's ensurepip installs, looked for where ensurepip looks: the
# distribution's shared directory where it keeps them apart (Debian and Ubuntu:
# /usr/share/python-wheels), then ensurepip's own.
FIND_PIP_WHEEL = (
    "import ensurepip, glob, os, sys, sysconfig; "
    "places = [sysconfig.get_config_var('WHEEL_PKG_DIR'), os.path.join(os.path.dirname(ensurepip.__file__), '_bundled')]; "
    "wheels = next((found for place in places if place and (found := sorted(glob.glob(os.path.join(place, 'pip-*.whl'))))), None); "
    "print(wheels[-1]) if wheels else sys.exit(f'no pip wheel for ensurepip in {places}')"
)


def tool_dir(package: str, version: str) -> str:
    return f"{TOOLS_ROOT}/{package}-{version}"


def tool_bin(package: str, version: str, command: str) -> str:
    return f"{tool_dir(package, version)}/bin/{command}"


def ensure_debs(packages: list[str]) -> None:
    """Install Debian packages that are missing; refresh apt only then, so a converged host
    reports no change."""
    missing = [name for name in packages if name not in ask(host, DebPackages)]
    if missing:
        apt.packages(name=f"install {' '.join(missing)}", packages=missing, update=True,
                     extra_install_args="-o DPkg::Lock::Timeout=300")


def install_tool(package: str, version: str, python: str, pip_args: list[str], installed: bool):
    """pip-install ``package==version`` into its own venv, unless ``installed`` (from a fact).

    ``pip_args``: the index (or mirror) and CA bundle options pip needs on this site."""
    if installed:
        return None
    # The venv module is a separate package on Debian and Ubuntu.
    ensure_debs(["python3-venv"])
    target = tool_dir(package, version)
    return server.shell(
        name=f"install {package} {version} in {target}",
        commands=[
            f"rm -rf {target} && {shlex.quote(python)} -m venv --without-pip {target} && "
            f"pip_wheel=$({target}/bin/python -c {shlex.quote(FIND_PIP_WHEEL)}) && "
            f"{target}/bin/python \"$pip_wheel/pip\" install --quiet --disable-pip-version-check --no-cache-dir "
            f"{shlex.join(pip_args)} {shlex.quote(f'{package}=={version}')}"
        ],
    )

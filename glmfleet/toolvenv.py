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

from pyinfra import host
from pyinfra.operations import server

from glmfleet.checks import without_credentials
from glmfleet.credentials import tool_environment
from glmfleet.facts.engine import ask
from glmfleet.facts.packages import DebPackageStates
from glmfleet.layout import SYSTEM_CA_BUNDLE
from glmfleet.operations import apt_install, packages_due
from glmfleet.shell import assignments, join, quote

# The pip wheel the interpreter's ensurepip installs, looked for where ensurepip looks: the
# distribution's shared directory where it keeps them apart (Debian and Ubuntu:
# /usr/share/python-wheels), then ensurepip's own.
FIND_PIP_WHEEL = (
    "import ensurepip, glob, os, sys, sysconfig; "
    "places = [sysconfig.get_config_var('WHEEL_PKG_DIR'), os.path.join(os.path.dirname(ensurepip.__file__), '_bundled')]; "
    "wheels = next((found for place in places if place and (found := sorted(glob.glob(os.path.join(place, 'pip-*.whl'))))), None); "
    "print(wheels[-1]) if wheels else sys.exit(f'no pip wheel for ensurepip in {places}')"
)


def index_args(cfg) -> list[str]:
    """pip's and uv's index options, without credentials (they come from ``layout.NETRC``)."""
    args = ["--index-url", without_credentials(cfg.pip_index_url)]
    for url in cfg.pip_extra_index_url:
        args += ["--extra-index-url", without_credentials(url)]
    for url in cfg.pip_find_links:
        args += ["--find-links", without_credentials(url)]
    return args


def pip_args(cfg) -> list[str]:
    """pip's options on this site: the host's CA store (a mirror's private CA) and the indexes."""
    return ["--cert", SYSTEM_CA_BUNDLE, *index_args(cfg)]


def ensure_debs(packages: list[str]) -> None:
    """Install Debian packages that are missing (``operations.apt_install``, which waits for
    the dpkg lock); a converged host plans nothing."""
    if packages_due(ask(host, DebPackageStates), {name: None for name in packages}):
        apt_install(name=f"install {' '.join(packages)}", packages={name: None for name in packages})


def install_tool(target: str, requirements: list[str], installed: bool, cfg) -> None:
    """pip-install pinned ``requirements`` (``name==version``) into their own venv, ``target``
    (``layout.tool_dir``), with the configured python and the site's indexes and CA store
    (``pip_args``; pip finds the indexes' logins through ``NETRC``), unless ``installed`` (from a fact)."""
    if installed:
        return None
    # The venv module is a separate package on Debian and Ubuntu.
    ensure_debs(["python3-venv"])
    python_of_venv = quote(f"{target}/bin/python")
    return server.shell(
        name=f"install {' '.join(requirements)} in {target}",
        commands=[
            f"rm -rf -- {quote(target)} && {quote(cfg.vllm_python)} -m venv --without-pip {quote(target)} && "
            f"pip_wheel=$({python_of_venv} -c {quote(FIND_PIP_WHEEL)}) && "
            f'{assignments(tool_environment(cfg))} {python_of_venv} "$pip_wheel/pip" install --quiet '
            f"--disable-pip-version-check --no-cache-dir {join(pip_args(cfg))} {join(requirements)}"
        ],
    )

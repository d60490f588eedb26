"""vllm_venv: the pinned vLLM in a Python venv built with uv, switched atomically."""

from __future__ import annotations

import hashlib
import json
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet.config import (
    HostConfig,
    Setting,
    documented,
    host_config,
    is_abs_path,
    is_one_of,
    is_pinned_requirement,
    is_str,
    is_url,
    is_url_list,
    is_version,
)
from glmfleet.facts import COMPLETE_MARKER, ManagedPaths, Question, VllmVenvs, ask_together
from glmfleet.operations import directory
from glmfleet.toolvenv import install_tool, tool_bin

VLLM_USER = "vllm"
NOLOGIN = "/usr/sbin/nologin"
UV_CACHE_DIR = "/var/cache/glmfleet/uv"
# Debian's and Ubuntu's bundle of the host's trusted CAs: a site's own CA (a proxy or mirror
# with a private certificate) goes there, and pip and uv must trust what the host trusts.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

SETTINGS = (
    Setting("vllm_runtime", "venv", "how vLLM runs: a Python venv on the host, or the official container image "
            "under systemd", "'venv' or 'image'", is_one_of("venv", "image")),
    Setting("vllm_package", "vllm", "the distribution that provides the `vllm` command (tests install a test double)",
            "a package name", is_str),
    Setting("vllm_version", "0.22.0", "exact version of vllm_package to install", "a version such as '0.22.0'", is_version),
    Setting("vllm_extra_packages", [], "companion pins installed with vLLM, e.g. 'transformers==4.57.6'",
            "a list of 'name==version' pins", lambda v: isinstance(v, list) and all(map(is_pinned_requirement, v))),
    Setting("vllm_python", "python3", "the host's Python interpreter the venv is made from (uv never downloads one)",
            "a command name or absolute path", is_str),
    Setting("vllm_venv_root", "/opt/glmfleet/vllm", "where venvs live; `current` links to the one in use, `previous` to the last",
            "an absolute path", is_abs_path),
    Setting("vllm_state_dir", "/var/lib/vllm", "the vllm user's home: Hugging Face cache and vLLM compile cache persist here",
            "an absolute path", is_abs_path),
    Setting("uv_version", "0.13.9", "uv version bootstrapped on the host to build venvs", "a version such as '0.13.9'", is_version),
    Setting("pip_index_url", "https://pypi.org/simple", "package index (a mirror on mirror-only sites)", "an http(s) or file URL", is_url),
    Setting("pip_extra_index_url", [], "further package indexes", "a list of http(s) or file URLs", is_url_list),
    Setting("pip_find_links", [], "directories or pages of wheels to install from", "a list of http(s) or file URLs", is_url_list),
)


def combination_problems(cfg: dict) -> list[str]:
    return []


def requirements(cfg: HostConfig) -> list[str]:
    return [f"{cfg.vllm_package}=={cfg.vllm_version}", *cfg.vllm_extra_packages]


def venv_name(cfg: HostConfig) -> str:
    """One directory per requirement set: the same pins always map to the same venv."""
    key = json.dumps({"python": cfg.vllm_python, "requirements": sorted(requirements(cfg))})
    return f"{cfg.vllm_package}-{cfg.vllm_version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def venv_dir(cfg: HostConfig) -> str:
    """Where the configured venv is built (``current`` points at it once switched)."""
    return f"{cfg.vllm_venv_root}/venvs/{venv_name(cfg)}"


def uv_path(cfg: HostConfig) -> str:
    return tool_bin("uv", cfg.uv_version, "uv")


def venv_bin(cfg: HostConfig, name: str) -> str:
    """A program of the venv in use, through the `current` link that rollbacks switch."""
    return f"{cfg.vllm_venv_root}/current/bin/{name}"


def index_args(cfg: HostConfig) -> list[str]:
    args = ["--index-url", cfg.pip_index_url]
    for url in cfg.pip_extra_index_url:
        args += ["--extra-index-url", url]
    for url in cfg.pip_find_links:
        args += ["--find-links", url]
    return args


# Run by the new venv's own python: the pinned version must be what got installed, and the
# `vllm` command's entry point must import.
IMPORT_CHECK = """
import sys
from importlib import metadata
package, version = sys.argv[1:3]
found = metadata.version(package)
if found != version:
    sys.exit(f"{package} {found} installed, {version} pinned")
entry = [ep for ep in metadata.distribution(package).entry_points if ep.group == "console_scripts" and ep.name == "vllm"]
if not entry:
    sys.exit(f"{package} {version} provides no vllm command")
entry[0].load()
print(f"{package} {found} imports")
"""


def venvs_question(cfg: HostConfig) -> Question:
    return Question(VllmVenvs, {"root": cfg.vllm_venv_root, "uv": uv_path(cfg)})


def state_dirs_paths(cfg: HostConfig) -> tuple[str, ...]:
    return cfg.vllm_state_dir, f"{cfg.vllm_state_dir}/huggingface", f"{cfg.vllm_state_dir}/cache"


def state_dirs_question(cfg: HostConfig) -> Question:
    return Question(ManagedPaths, {"paths": list(state_dirs_paths(cfg)), "users": [VLLM_USER]})


def questions(cfg: HostConfig) -> dict[str, Question]:
    """What this role reads from the host, by name; ``roles.serving_host`` asks every role's in one command."""
    if cfg.vllm_runtime != "venv":
        return {}
    return {"venvs": venvs_question(cfg), "state_dirs": state_dirs_question(cfg)}


@deploy("vLLM venv")
@documented(SETTINGS)
def vllm_venv(switch=True):
    """
    Install the pinned vLLM into its own venv with uv and point ``current`` at it.

    + switch: set False to build the venv only, leaving ``current`` (and the running service)
      as they are: a rollout builds while the host still serves, and switches after draining

    Each requirement set gets its own directory, marked complete only after its ``vllm``
    entry point imports; ``current`` switches to it atomically and ``previous`` keeps the venv
    it replaces for rollback. The same pins on a re-run mean no uv invocation at all.

    Returns the operations whose change means the service must restart.
    """
    cfg = host_config(host)
    if cfg.vllm_runtime != "venv":
        return []
    root = cfg.vllm_venv_root
    name = venv_name(cfg)
    uv = uv_path(cfg)

    answers = ask_together(host, questions(cfg))
    venvs = answers["venvs"]
    state_dirs(cfg, answers["state_dirs"])

    install_tool("uv", cfg.uv_version, cfg.vllm_python, ["--cert", SYSTEM_CA_BUNDLE, *index_args(cfg)], installed=venvs["uv"])

    if name not in venvs["complete"]:
        target = venv_dir(cfg)
        uv_env = f"UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never UV_CACHE_DIR={UV_CACHE_DIR}"
        server.shell(
            name=f"build venv {name}: {' '.join(requirements(cfg))}",
            commands=[
                f"rm -rf {target} && mkdir -p {root}/venvs && "
                f"{uv_env} {uv} venv --quiet --python {shlex.quote(cfg.vllm_python)} {target} && "
                # Bytecode now: the vllm user cannot write __pycache__ into this root-owned venv, and
                # without it every start compiles vLLM and torch again (H100: 93.5 s -> 52.9 s warm).
                f"{uv_env} {uv} pip install --quiet --compile-bytecode --python {target}/bin/python "
                f"{shlex.join(index_args(cfg))} {shlex.join(requirements(cfg))} && "
                f"{target}/bin/python -c {shlex.quote(IMPORT_CHECK)} {shlex.quote(cfg.vllm_package)} "
                f"{shlex.quote(cfg.vllm_version)} && touch {target}/{COMPLETE_MARKER}"
            ],
        )

    return vllm_venv_switch() if switch else []


@deploy("vLLM venv switch")
def vllm_venv_switch():
    """
    Point ``current`` at the configured venv, which ``vllm_venv`` built, keeping the venv it
    replaces as ``previous`` for rollback; nothing when it already points there.

    Returns the operations whose change means the service must restart.
    """
    cfg = host_config(host)
    if cfg.vllm_runtime != "venv":
        return []
    name = venv_name(cfg)
    current = venvs_question(cfg).of(host)["current"]
    if current == name:
        return []
    # The switch keeps exactly two venvs: the new current and the previous one, for rollback.
    return [server.shell(name=f"switch current venv to {name}", commands=[switch_command(cfg.vllm_venv_root, name, current)])]


def state_dirs(cfg: HostConfig, managed: dict) -> None:
    """The vllm system user and its state directory (caches), for either runtime.

    + managed: the answer to ``state_dirs_question``
    """
    if managed["users"].get(VLLM_USER) != {"group": VLLM_USER, "home": cfg.vllm_state_dir, "shell": NOLOGIN}:
        server.group(name="vllm group", group=VLLM_USER, system=True)
        server.user(
            name="vllm system user",
            user=VLLM_USER,
            group=VLLM_USER,
            system=True,
            home=cfg.vllm_state_dir,
            create_home=False,
            shell=NOLOGIN,
        )
    for path in state_dirs_paths(cfg):
        directory(managed, path, user=VLLM_USER, group=VLLM_USER, mode="750", name=f"vllm state dir {path}")


def switch_command(root: str, name: str, current: str | None) -> str:
    keep = {name, current} - {None}
    steps = [f"cd {root}", f"ln -sfn venvs/{name} current.new", "mv -Tf current.new current"]
    if current:
        steps += [f"ln -sfn venvs/{current} previous.new", "mv -Tf previous.new previous"]
    steps.append("for d in venvs/*; do case ${d#venvs/} in " + "|".join(sorted(keep)) + ') ;; *) rm -rf "$d";; esac; done')
    return " && ".join(steps)

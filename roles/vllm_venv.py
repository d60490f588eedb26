"""vllm_venv: the pinned vLLM in a Python venv built with uv, switched atomically."""

from __future__ import annotations

import hashlib
import json

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import catalog, checks, compat
from glmfleet.checks import without_credentials
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.credentials import tool_environment
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.paths import ManagedPaths
from glmfleet.facts.vllm import VllmVenvs
from glmfleet.layout import (
    COMPLETE_MARKER,
    NOLOGIN,
    UNIT,
    UV_CACHE_DIR,
    VLLM_USER,
    current_bin,
    state_subdirs,
    tool_bin,
    tool_dir,
    venvs_dir,
)
from glmfleet.layout import (
    venv_dir as venv_path,
)
from glmfleet.operations import owned_directory, service_user_dirs
from glmfleet.shell import assignments, join, quote
from glmfleet.toolvenv import index_args, install_tool

SETTINGS = (
    Setting(
        "vllm_runtime",
        "venv",
        "how vLLM runs: a Python venv on the host, or the official container image under systemd",
        checks.one_of("venv", "image"),
    ),
    Setting(
        "vllm_package",
        "vllm",
        "the distribution that provides the `vllm` command (tests install a test double)",
        checks.package_name,
    ),
    Setting(
        "vllm_version",
        "0.33.0",
        "exact version of vllm_package to install (default: the release the catalog checked the model with; "
        "this one for a model the catalog does not know)",
        checks.version("0.33.0"),
    ),
    Setting(
        "vllm_extra_packages",
        [],
        "companion pins installed with vLLM, e.g. 'transformers==4.57.6'",
        checks.list_of(checks.pinned_requirement, "a list of 'name==version' pins"),
    ),
    Setting(
        "vllm_python",
        "python3",
        "the host's Python interpreter the venv is made from (uv never downloads one)",
        checks.command,
    ),
    Setting(
        "vllm_venv_root",
        "/opt/glmfleet/vllm",
        "where venvs live; `current` links to the one in use, `previous` to the last (made by glmfleet, root's)",
        checks.owned_dir,
    ),
    Setting(
        "vllm_state_dir",
        "/var/lib/vllm",
        "the vllm user's home: Hugging Face cache and vLLM compile cache persist "
        "here (made by glmfleet, the vllm user's)",
        checks.owned_dir,
    ),
    Setting("uv_version", "0.13.9", "uv version bootstrapped on the host to build venvs", checks.version("0.13.9")),
    Setting(
        "pip_index_url",
        "https://pypi.org/simple",
        "package index (a mirror on mirror-only sites); credentials in "
        "it go to a root-only netrc, never to a command line",
        checks.url,
    ),
    Setting(
        "pip_extra_index_url",
        [],
        "further package indexes",
        checks.list_of(checks.url, "a list of http(s) or file URLs"),
    ),
    Setting(
        "vllm_flashinfer_index_url",
        "https://flashinfer.ai/whl",
        "where FlashInfer's precompiled kernels come from (its wheel index, or a mirror of it), installed "
        "with vLLM from 0.32 on so that a host without internet starts without fetching them; None: "
        "FlashInfer fetches or compiles them at the first start",
        checks.optional(checks.http_url),
    ),
    Setting(
        "pip_find_links",
        [],
        "directories or pages of wheels to install from",
        checks.list_of(checks.url, "a list of http(s) or file URLs"),
    ),
)


def requirements(cfg: HostConfig) -> list[str]:
    return [f"{cfg.vllm_package}=={cfg.vllm_version}", *cfg.vllm_extra_packages]


def flashinfer_kernels_command(cfg: HostConfig, python: str) -> str | None:
    """FlashInfer's own ``download-kernels`` (what ``vllm download-kernels`` runs, from vLLM 0.32)
    with the configured index: the kernels FlashInfer would otherwise download or compile at
    the first start go into the venv now. None where the release ships them or has no such
    command (catalog: vllm.flashinfer_kernels). FlashInfer installs them with the uv on PATH."""
    release = compat.vllm_release(cfg)
    facts = catalog.vllm_facts()
    if release is None or not cfg.vllm_flashinfer_index_url or facts.flashinfer_kernels_for(release) != "download":
        return None
    cuda = facts.cuda_runtime_for(release)
    index = without_credentials(cfg.vllm_flashinfer_index_url).rstrip("/")
    env = {"FLASHINFER_DISABLE_VERSION_CHECK": "1", "PATH": f"{tool_dir('uv', cfg.uv_version)}/bin:/usr/bin:/bin"}
    return f"{assignments(env)} " + join(
        [
            python,
            "-m",
            "flashinfer",
            "download-kernels",
            "--cubin-index-url",
            index,
            "--jit-cache-index-url",
            f"{index}/cu{cuda.major}{cuda.minor}",
        ]
    )


def venv_name(cfg: HostConfig) -> str:
    """One directory per requirement set: the same pins always map to the same venv."""
    key = json.dumps({"python": cfg.vllm_python, "requirements": sorted(requirements(cfg))})
    return f"{cfg.vllm_package}-{cfg.vllm_version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def venv_dir(cfg: HostConfig) -> str:
    """Where the configured venv is built (``current`` points at it once switched)."""
    return venv_path(cfg.vllm_venv_root, venv_name(cfg))


def uv_path(cfg: HostConfig) -> str:
    return tool_bin("uv", cfg.uv_version, "uv")


def venv_bin(cfg: HostConfig, name: str) -> str:
    """A program of the venv in use, through the `current` link that rollbacks switch."""
    return current_bin(cfg.vllm_venv_root, name)


# Run by the new venv's own python: the pinned version must be what got installed, and the
# `vllm` command's entry point must import. It prints what the completion marker records: the
# files, relative to the venv, whose loss makes the venv incomplete (the VllmVenvs fact checks
# them, a few stats, on every run).
IMPORT_CHECK = """
import os, sys
from importlib import metadata
package, version = sys.argv[1:3]
found = metadata.version(package)
if found != version:
    sys.exit(f"{package} {found} installed, {version} pinned")
distribution = metadata.distribution(package)
entry = [ep for ep in distribution.entry_points if ep.group == "console_scripts" and ep.name == "vllm"]
if not entry:
    sys.exit(f"{package} {version} provides no vllm command")
entry[0].load()
module = sys.modules[entry[0].module.split(".")[0]]
for path in ("bin/python", "bin/vllm", distribution._path, module.__file__):
    print(os.path.relpath(os.path.join(sys.prefix, path), sys.prefix))
"""


def venvs_question(cfg: HostConfig) -> Question:
    return Question(VllmVenvs, {"root": cfg.vllm_venv_root, "uv": uv_path(cfg)})


def state_dirs_paths(cfg: HostConfig) -> tuple[str, ...]:
    return cfg.vllm_state_dir, *state_subdirs(cfg.vllm_state_dir).values()


def state_dirs_question(cfg: HostConfig) -> Question:
    return Question(ManagedPaths, {"paths": list(state_dirs_paths(cfg)), "users": [VLLM_USER], "units": [UNIT]})


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.vllm_runtime != "venv":
        return {}
    return {
        "venvs": venvs_question(cfg),
        "state_dirs": state_dirs_question(cfg),
        "root": Question(ManagedPaths, {"paths": [cfg.vllm_venv_root]}),
    }


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

    Returns the operations whose change means the service must restart: the switch, or the
    rebuild of the venv in use where it was found damaged.
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
    owned_directory(answers["root"], root, "vllm_venv_root")

    install_tool(tool_dir("uv", cfg.uv_version), [f"uv=={cfg.uv_version}"], installed=venvs["uv"], cfg=cfg)

    rebuilt = []
    if name not in venvs["complete"]:
        target = venv_dir(cfg)
        uv_env = assignments(
            {
                "UV_SYSTEM_CERTS": "1",
                "UV_PYTHON_DOWNLOADS": "never",
                "UV_CACHE_DIR": UV_CACHE_DIR,
                **tool_environment(cfg),
            }
        )
        python = f"{target}/bin/python"
        build = server.shell(
            name=f"build venv {name}: {' '.join(requirements(cfg))}",
            commands=[
                f"rm -rf -- {quote(target)} && mkdir -p -- {quote(venvs_dir(root))} && "
                f"{uv_env} {quote(uv)} venv --quiet --python {quote(cfg.vllm_python)} {quote(target)} && "
                # Bytecode now: the vllm user cannot write __pycache__ into this root-owned venv, and
                # without it every start compiles vLLM and torch again (H100: 93.5 s -> 52.9 s warm).
                f"{uv_env} {quote(uv)} pip install --quiet --compile-bytecode --python {quote(python)} "
                f"{join(index_args(cfg))} {join(requirements(cfg))} && "
                + (f"{uv_env} {kernels} && " if (kernels := flashinfer_kernels_command(cfg, python)) else "")
                + f"{join([python, '-c', IMPORT_CHECK, cfg.vllm_package, cfg.vllm_version])} > {quote(f'{target}/{COMPLETE_MARKER}.new')} && "
                + f"mv -f -- {quote(f'{target}/{COMPLETE_MARKER}.new')} {quote(f'{target}/{COMPLETE_MARKER}')}"
            ],
        )

        # The venv in use, damaged (a file its marker records is gone): rebuilt where it is, so the
        # service must restart on it.
        if venvs["current"] == name:
            rebuilt.append(build)
    return rebuilt + (vllm_venv_switch() if switch else [])


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
    return [
        server.shell(
            name=f"switch current venv to {name}", commands=[switch_command(cfg.vllm_venv_root, name, current)]
        )
    ]


def state_dirs(cfg: HostConfig, managed: dict) -> None:
    """The vllm system user and its state directory (caches), for either runtime.

    + managed: the answer to ``state_dirs_question``
    """
    user = managed["users"].get(VLLM_USER)
    if user != {"group": VLLM_USER, "home": cfg.vllm_state_dir, "shell": NOLOGIN}:
        if user and user["home"] != cfg.vllm_state_dir and managed["units"].get(UNIT, {}).get("running"):
            # usermod refuses to move the home of a user whose processes run; the service restarts
            # on the new state directory once its unit names it.
            server.shell(
                name=f"stop {UNIT}: vllm_state_dir moves from {user['home']} to {cfg.vllm_state_dir}",
                commands=[f"systemctl stop {quote(UNIT)}"],
            )
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
    owned_directory(managed, cfg.vllm_state_dir, "vllm_state_dir", user=VLLM_USER, group=VLLM_USER, mode="750")
    names = [path.rsplit("/", 1)[1] for path in state_subdirs(cfg.vllm_state_dir).values()]
    service_user_dirs(managed, cfg.vllm_state_dir, names, VLLM_USER)


def switch_command(root: str, name: str, current: str | None) -> str:
    """Point ``current`` at venvs/NAME and ``previous`` at the venv it replaces, each link
    replaced atomically, and remove every other venv."""
    keep = sorted({name, current} - {None})
    steps = [f"cd -- {quote(root)}", f"ln -sfn {quote(f'venvs/{name}')} current.new", "mv -Tf current.new current"]
    if current:
        steps += [f"ln -sfn {quote(f'venvs/{current}')} previous.new", "mv -Tf previous.new previous"]
    steps.append(
        f'for d in venvs/*; do case "${{d#venvs/}}" in {"|".join(map(quote, keep))}) ;; *) rm -rf -- "$d";; esac; done'
    )
    return " && ".join(steps)

"""vllm_service: a systemd unit that runs ``vllm serve`` for the configured model."""

from __future__ import annotations

import json
import re

from packaging.version import Version
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.util import get_template
from pyinfra.operations import server, systemd
from pyinfra.operations.util import any_changed

from glmfleet import FILES, catalog
from glmfleet.config import (
    HostConfig,
    Setting,
    documented,
    host_config,
    is_abs_path,
    is_bool,
    is_env_dict,
    is_int_in,
    is_listen_address,
    is_number_in,
    is_str,
    is_str_list,
    optional,
)
from glmfleet.facts import ManagedPaths, Question, ask_together
from glmfleet.operations import directory, planned, unit_enabled, upload
from roles.model_weights import check_argv, model_path
from roles.vllm_image import CONTAINER, docker_run
from roles.vllm_venv import VLLM_USER, venv_bin

UNIT = "vllm.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
SECRETS_DIR = "/etc/glmfleet"
ENV_FILE = f"{SECRETS_DIR}/vllm.env"
TEMPLATE = FILES / "vllm.service.j2"


def is_model(value) -> bool:
    """A catalog name (files/catalog.yaml), a hub repo id (``owner/name``) or an absolute path."""
    return is_str(value) and (
        is_abs_path(value) or re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None or catalog.find(value) is not None
    )


def is_mm_limits(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(is_str(k) and type(v) is int and v >= 0 for k, v in value.items())


SETTINGS = (
    Setting("model", "zai-org/GLM-4-9B-0414", "the model to serve: a catalog name (README: Model catalog) or a hub repo id (its files: see model_source)",
            "a catalog name such as 'glm-4.7-flash', 'owner/name' or an absolute path", is_model),
    Setting("vllm_host", "127.0.0.1", "address vLLM listens on", "an IP address such as '127.0.0.1' or '0.0.0.0'", is_listen_address),
    Setting("vllm_port", 8000, "TCP port vLLM listens on", "an integer 1-65535", is_int_in(1, 65535)),
    Setting("vllm_served_model_name", None, "the name clients ask for (default: the model)", "None or a name",
            optional(lambda v: is_str(v) and not any(c.isspace() for c in v))),
    Setting("vllm_tensor_parallel_size", 1, "GPUs one model instance spans", "an integer 1-64", is_int_in(1, 64)),
    Setting("vllm_pipeline_parallel_size", 1, "pipeline stages; GPUs used = tensor x pipeline parallel size", "an integer 1-64",
            is_int_in(1, 64)),
    Setting("vllm_max_model_len", None, "context length (default: the model's own)", "None or an integer 128-10485760",
            optional(is_int_in(128, 10485760))),
    Setting("vllm_gpu_memory_utilization", 0.9, "share of each GPU's memory vLLM may take", "a number > 0 and <= 1",
            is_number_in(0, 1)),
    Setting("vllm_trust_remote_code", False, "let the model's own Python code run (some GLM repos need it)", "true or false", is_bool),
    Setting("vllm_tool_call_parser", None, "how vLLM parses the model's tool calls (the catalog sets it per model)",
            "None or a parser name such as 'glm45'", optional(is_str)),
    Setting("vllm_enable_auto_tool_choice", False, "let the model decide when to call tools (needs vllm_tool_call_parser)",
            "true or false", is_bool),
    Setting("vllm_reasoning_parser", None, "how vLLM separates the model's reasoning from its answer (the catalog sets it)",
            "None or a parser name such as 'glm45'", optional(is_str)),
    Setting("vllm_limit_mm_per_prompt", None, "most images, videos... one prompt may carry (multimodal models)",
            "None or a mapping such as {'image': 4, 'video': 1}", optional(is_mm_limits)),
    Setting("vllm_extra_args", [], "further `vllm serve` flags, e.g. ['--enable-prefix-caching']",
            "a list of strings, none of them a flag that another key sets", is_str_list),
    Setting("vllm_env", {}, "extra environment for vLLM, e.g. {'VLLM_LOGGING_LEVEL': 'DEBUG'}",
            "a mapping of variable names to one-line strings", is_env_dict),
    Setting("vllm_api_key", None, "API key clients must send (kept in a root-only file)", "None or a string", optional(is_str), secret=True),
    Setting("vllm_shutdown_timeout", 30, "seconds in-flight requests get to finish on stop (vLLM >= 0.18)", "an integer 0-3600",
            is_int_in(0, 3600)),
    Setting("vllm_start_timeout", 1800, "seconds a start (weights load, compile) may take", "an integer 60-86400", is_int_in(60, 86400)),
)

# Flags a key already renders: given again in vllm_extra_args they would silently conflict.
FLAG_KEYS = {
    "--host": "vllm_host",
    "--port": "vllm_port",
    "--served-model-name": "vllm_served_model_name",
    "--tensor-parallel-size": "vllm_tensor_parallel_size",
    "-tp": "vllm_tensor_parallel_size",
    "--pipeline-parallel-size": "vllm_pipeline_parallel_size",
    "-pp": "vllm_pipeline_parallel_size",
    "--tool-call-parser": "vllm_tool_call_parser",
    "--enable-auto-tool-choice": "vllm_enable_auto_tool_choice",
    "--reasoning-parser": "vllm_reasoning_parser",
    "--limit-mm-per-prompt": "vllm_limit_mm_per_prompt",
    "--max-model-len": "vllm_max_model_len",
    "--gpu-memory-utilization": "vllm_gpu_memory_utilization",
    "--revision": "model_revision",
    "--model": "model",
    "--trust-remote-code": "vllm_trust_remote_code",
    "--shutdown-timeout": "vllm_shutdown_timeout",
    "--api-key": "vllm_api_key",
}
# Variables glmfleet sets itself, or that hold secrets and belong in the secret keys.
ENV_KEYS = {
    "VLLM_API_KEY": "vllm_api_key",
    "HF_TOKEN": "hf_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_token",
    "HF_HUB_OFFLINE": "model_source",
    "HF_HOME": "vllm_state_dir",
    "VLLM_CACHE_ROOT": "vllm_state_dir",
    "HOME": "vllm_state_dir",
}


def combination_problems(cfg: dict) -> list[str]:
    found = []
    for arg in cfg["vllm_extra_args"]:
        flag = arg.split("=", 1)[0]
        if flag in FLAG_KEYS:
            found.append(f"vllm_extra_args contains {flag!r}; set {FLAG_KEYS[flag]} instead"
                         + (" (a key on the command line is visible to every user)" if flag == "--api-key" else ""))
    for name in cfg["vllm_env"]:
        if name in ENV_KEYS:
            found.append(f"vllm_env sets {name}; set {ENV_KEYS[name]} instead")
    return found


def served_model_name(cfg: HostConfig) -> str:
    return cfg.vllm_served_model_name or cfg.model


def drains_on_stop(cfg: HostConfig) -> bool:
    """vLLM finishes in-flight requests on SIGTERM from 0.18 on (``--shutdown-timeout``)."""
    return Version(cfg.vllm_version).release >= (0, 18)


def vllm_command(cfg: HostConfig) -> list[str]:
    """The unit's ExecStart, as an argv: ``vllm serve`` with the configured flags, from the venv
    or inside the container."""
    if cfg.vllm_runtime == "image":
        return [*docker_run(cfg, ENV_FILE), "serve", *serve_args(cfg)]
    return [venv_bin(cfg, "vllm"), "serve", *serve_args(cfg)]


def serve_args(cfg: HostConfig) -> list[str]:
    """What follows ``vllm serve``: the model and the configured flags."""
    argv = [
        model_path(cfg),
        "--host", cfg.vllm_host,
        "--port", str(cfg.vllm_port),
        "--served-model-name", served_model_name(cfg),
        "--tensor-parallel-size", str(cfg.vllm_tensor_parallel_size),
        "--gpu-memory-utilization", str(cfg.vllm_gpu_memory_utilization),
    ]
    if cfg.vllm_pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(cfg.vllm_pipeline_parallel_size)]
    if cfg.vllm_max_model_len:
        argv += ["--max-model-len", str(cfg.vllm_max_model_len)]
    if cfg.vllm_trust_remote_code:
        argv.append("--trust-remote-code")
    if cfg.vllm_tool_call_parser:
        argv += ["--tool-call-parser", cfg.vllm_tool_call_parser]
    if cfg.vllm_enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    if cfg.vllm_reasoning_parser:
        argv += ["--reasoning-parser", cfg.vllm_reasoning_parser]
    if cfg.vllm_limit_mm_per_prompt:
        argv += ["--limit-mm-per-prompt", json.dumps(cfg.vllm_limit_mm_per_prompt, separators=(",", ":"))]
    if drains_on_stop(cfg):
        argv += ["--shutdown-timeout", str(cfg.vllm_shutdown_timeout)]
    return argv + list(cfg.vllm_extra_args)


def vllm_environment(cfg: HostConfig) -> dict[str, str]:
    """The unit's EnvironmentFile: caches on persistent paths, secrets, and ``vllm_env``."""
    env = {
        "HOME": cfg.vllm_state_dir,
        "HF_HOME": f"{cfg.vllm_state_dir}/huggingface",
        "VLLM_CACHE_ROOT": f"{cfg.vllm_state_dir}/cache",
        # The weights are fetched and verified by the model_weights role: vLLM only reads them.
        "HF_HUB_OFFLINE": "1",
        # A fleet's servers do not report usage to third parties.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if cfg.vllm_api_key:
        env["VLLM_API_KEY"] = cfg.vllm_api_key
    env.update(cfg.vllm_env)
    return env


def systemd_quote(arg: str) -> str:
    """Quote one argument for ExecStart, which splits on spaces and expands ``$`` and ``%``."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[\w@%+=:,./$-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_env_file(env: dict[str, str], runtime: str = "venv") -> str:
    """The environment file: systemd's quoted ``KEY="value"`` for the venv's unit, Docker's
    ``--env-file`` lines (``KEY=value``, taken literally) for the container."""
    lines = ["# Managed by glmfleet. Root-only: it holds secrets."]
    if runtime == "image":
        lines += [f"{key}={value}" for key, value in env.items()]
    else:
        lines += [f'{key}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for key, value in env.items()]
    return "\n".join(lines) + "\n"


def service_question() -> Question:
    """The ManagedPaths fact of what this role writes: its directory, files and unit (the flag
    check reads the unit's sha256 from it too, so the host is asked once)."""
    return Question(ManagedPaths, {"paths": [SECRETS_DIR, ENV_FILE, UNIT_PATH], "units": [UNIT]})


def questions(cfg: HostConfig) -> dict[str, Question]:
    """What this role reads from the host, by name; ``roles.serving_host`` asks every role's in one command."""
    return {"managed": service_question()}


def render_unit(cfg: HostConfig) -> str:
    return get_template(str(TEMPLATE)).render(
        runtime=cfg.vllm_runtime,
        container=CONTAINER,
        served_model_name=served_model_name(cfg),
        user=VLLM_USER,
        state_dir=cfg.vllm_state_dir,
        env_file=ENV_FILE,
        exec_start=" ".join(systemd_quote(arg) for arg in vllm_command(cfg)),
        exec_start_pre=" ".join(systemd_quote(arg) for arg in check_argv(cfg)),
        restart_sec=15,
        start_timeout=cfg.vllm_start_timeout,
        stop_timeout=cfg.vllm_shutdown_timeout + 30,
        # docker stop's own grace, inside systemd's: the container is killed before the unit is.
        container_stop_timeout=cfg.vllm_shutdown_timeout + 15,
        writable_paths=[cfg.vllm_state_dir],
    )


@deploy("vLLM service")
@documented(SETTINGS)
def vllm_service(restart_when=()):
    """
    Write the vLLM unit and its root-only environment file, and keep the service running.

    + restart_when: operations (e.g. the venv switch) whose change also needs a restart

    daemon-reload runs only when the unit changed; a stopped service starts, and a running one
    restarts only when its unit, its environment or ``restart_when`` changed. Returns the
    (re)start, for the verify role, or None where the service runs and none of these can
    change: a converged host plans no operation at all.
    """
    cfg = host_config(host)
    managed = ask_together(host, questions(cfg))["managed"]
    was_active = managed["units"].get(UNIT, {}).get("running", False)

    directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")
    env = upload(managed, ENV_FILE, render_env_file(vllm_environment(cfg), cfg.vllm_runtime), mode="600",
                 name=f"environment file {ENV_FILE}", secret=True)
    unit = upload(managed, UNIT_PATH, render_unit(cfg), name=f"unit {UNIT}")
    if unit:
        systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    unit_enabled(managed, UNIT)
    changed = planned(env, unit, *restart_when)
    if was_active and not changed:
        return None
    # reset-failed clears systemd's start limit, which a crash loop before this deploy may have
    # hit. A start that fails is not fatal here: verify judges it and shows the journal.
    return server.shell(
        name=f"(re)start {UNIT}",
        commands=[f"systemctl reset-failed {UNIT} 2>/dev/null; systemctl restart {UNIT} || true"],
        _if=[any_changed(*changed)] if was_active else [],
    )

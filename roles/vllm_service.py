"""vllm_service: a systemd unit that runs ``vllm serve`` for the configured model."""

from __future__ import annotations

import hashlib
import json
import re
from io import StringIO

from packaging.version import Version
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.util import get_template
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from glmfleet import FILES, catalog, checks, compat, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config, replica_group
from glmfleet.facts.engine import Question, ask, ask_together
from glmfleet.facts.gpu import gpu_generation
from glmfleet.facts.paths import ManagedPaths
from glmfleet.groups import ReplicaGroup
from glmfleet.layout import (
    CONTAINER,
    ENV_FILE,
    SECRETS_DIR,
    STAGED_UNIT,
    STAGING_DIR,
    UNIT,
    UNIT_PATH,
    VLLM_USER,
    current_link,
    model_dir,
    state_subdirs,
    weights_check_argv,
)
from glmfleet.operations import directory, journal_tail, planned, unit_enabled, upload
from glmfleet.shell import join, quote
from roles.nvidia_driver import gpu_question
from roles.vllm_image import docker_run
from roles.vllm_venv import venv_bin

TEMPLATE = FILES / "vllm.service.j2"


def is_model(value) -> bool:
    """A catalog name (files/catalog.yaml) or a hub repo id (``owner/name``); a path is refused
    with its own message (model_dir)."""
    return checks.is_str(value) and (
        checks.is_abs_path(value)
        or re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", value) is not None
        and not {".", ".."} & set(value.split("/"))
        or catalog.find(value) is not None
    )


mm_limits = checks.mapping(checks.word(), checks.int_in(0, 10**6), "a mapping such as {'image': 4, 'video': 1}")
speculative_config = checks.mapping(
    checks.word(),
    checks.Check(lambda v: type(v) in (str, int, float, bool) and not checks.control_characters(v), ""),
    "a mapping of vLLM's speculative-config fields to strings, numbers or booleans, such as "
    "{'method': 'mtp', 'num_speculative_tokens': 3}; {} turns the catalog's off",
)
# vLLM's --kv-cache-dtype choices from 0.22.0 to 0.33.0 (CacheDType, vllm/config/cache.py); the
# host's own vLLM parser refuses one its release lacks.
KV_CACHE_DTYPES = (
    "auto",
    "bfloat16",
    "float16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
    "fp8_per_token_head",
    "int8_per_token_head",
    "int4_per_token_head",
    "nvfp4",
    "nvfp4_4over6",
    "nvfp4_ds_mla",
)

SETTINGS = (
    Setting(
        "model",
        "zai-org/GLM-4-9B-0414",
        "the model to serve: a catalog name (README: Model catalog) or a hub repo id (its files: see model_source)",
        checks.Check(is_model, "a catalog name such as 'glm-4.7-flash' or 'owner/name'"),
    ),
    Setting(
        "vllm_host",
        "127.0.0.1",
        "address vLLM listens on (another than loopback needs vllm_api_key, or vllm_allow_unauthenticated)",
        checks.listen_address,
    ),
    Setting("vllm_port", 8000, "TCP port vLLM listens on", checks.int_in(1, 65535)),
    Setting(
        "vllm_served_model_name",
        None,
        "the name clients ask for (default: the model)",
        checks.optional(checks.word("a name")),
    ),
    Setting("vllm_tensor_parallel_size", 1, "GPUs one model instance spans", checks.int_in(1, 64)),
    Setting(
        "vllm_pipeline_parallel_size",
        1,
        "pipeline stages; GPUs used = tensor x pipeline parallel size",
        checks.int_in(1, 64),
    ),
    Setting(
        "vllm_data_parallel_size",
        1,
        "copies of the model on one host, each on tensor x pipeline parallel GPUs, behind one API server",
        checks.int_in(1, 64),
    ),
    Setting(
        "vllm_enable_expert_parallel",
        False,
        "spread a mixture-of-experts model's experts over the GPUs instead of slicing each (the catalog "
        "sets it per model)",
        checks.boolean,
    ),
    Setting(
        "vllm_speculative_config",
        None,
        "speculative decoding, as vLLM's --speculative-config (the catalog turns on the model's own MTP "
        "layers where its recipe does)",
        checks.optional(speculative_config),
    ),
    Setting(
        "vllm_kv_cache_dtype",
        None,
        "KV-cache dtype (default: the catalog's for the host's GPU generation, else vLLM's auto)",
        checks.optional(checks.one_of(*KV_CACHE_DTYPES)),
    ),
    Setting(
        "vllm_chat_template_content_format",
        None,
        "how message content reaches the chat template (the catalog sets 'string' where the model needs it)",
        checks.optional(checks.one_of("auto", "string", "openai")),
    ),
    Setting(
        "vllm_max_model_len",
        None,
        "context length (default: the model's own)",
        checks.optional(checks.int_in(128, 10485760)),
    ),
    Setting("vllm_gpu_memory_utilization", 0.9, "share of each GPU's memory vLLM may take", checks.number_in(0, 1)),
    Setting(
        "vllm_trust_remote_code", False, "let the model's own Python code run (some GLM repos need it)", checks.boolean
    ),
    Setting(
        "vllm_tool_call_parser",
        None,
        "how vLLM parses the model's tool calls (the catalog sets it per model)",
        checks.optional(checks.word("a parser name such as 'glm45'")),
    ),
    Setting(
        "vllm_enable_auto_tool_choice",
        False,
        "let the model decide when to call tools (needs vllm_tool_call_parser)",
        checks.boolean,
    ),
    Setting(
        "vllm_reasoning_parser",
        None,
        "how vLLM separates the model's reasoning from its answer (the catalog sets it)",
        checks.optional(checks.word("a parser name such as 'glm45'")),
    ),
    Setting(
        "vllm_limit_mm_per_prompt",
        None,
        "most images, videos... one prompt may carry (multimodal models)",
        checks.optional(mm_limits),
    ),
    Setting(
        "vllm_extra_args",
        [],
        "further `vllm serve` flags, e.g. ['--enable-prefix-caching']",
        checks.list_of(checks.text(), "a list of strings, none of them a flag that another key sets"),
    ),
    Setting(
        "vllm_env",
        {},
        "extra environment for vLLM, e.g. {'VLLM_LOGGING_LEVEL': 'DEBUG'}",
        checks.mapping(
            checks.env_name,
            checks.Check(lambda v: isinstance(v, str), ""),
            "a mapping of variable names to one-line strings",
        ),
    ),
    Setting(
        "vllm_api_key",
        None,
        "API key clients must send (kept in a root-only file)",
        checks.optional(checks.printable_ascii("printable ASCII without spaces (clients send it in an HTTP header)")),
        secret=True,
    ),
    Setting(
        "vllm_allow_unauthenticated",
        False,
        "serve without an API key on an address other than loopback (every "
        "client that reaches the port may use the model): say so here, or set vllm_api_key",
        checks.boolean,
    ),
    Setting(
        "vllm_shutdown_timeout",
        30,
        "seconds in-flight requests get to finish on stop (vLLM >= 0.18)",
        checks.int_in(0, 3600),
    ),
    Setting("vllm_start_timeout", 1800, "seconds a start (weights load, compile) may take", checks.int_in(60, 86400)),
    Setting(
        "vllm_group",
        None,
        "the replica group this host is a rank of: one model served by several hosts (README: Several hosts "
        "per replica); None: the host serves alone",
        checks.optional(checks.matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", "a name of letters, digits, . _ -")),
    ),
    Setting(
        "vllm_group_rank",
        0,
        "this host's rank in its replica group: 0 is the head, the others follow in order",
        checks.int_in(0, 255),
    ),
    Setting(
        "vllm_group_address",
        None,
        "the address the group's other ranks reach this host on (VLLM_HOST_IP; default: its inventory "
        "address, where that is an IP)",
        checks.optional(checks.Check(checks.is_ip, "an IP address")),
    ),
    Setting(
        "vllm_group_interface",
        None,
        "the network interface NCCL and Gloo use between the group's hosts (NCCL_SOCKET_IFNAME, "
        "GLOO_SOCKET_IFNAME); None: their own choice",
        checks.optional(checks.matches(r"[A-Za-z0-9_.:-]{1,15}", "an interface name such as 'eth0' or 'ib0'")),
    ),
    Setting(
        "vllm_group_master_port",
        29501,
        "TCP port on the group's head where every rank joins (--master-port; tensor and pipeline parallel groups)",
        checks.int_in(1, 65535),
    ),
    Setting(
        "vllm_group_rpc_port",
        29550,
        "TCP port on the group's head for data parallel ranks (--data-parallel-rpc-port)",
        checks.int_in(1, 65535),
    ),
    Setting(
        "vllm_group_join_timeout",
        600,
        "seconds a rank waits for the whole group to join (--distributed-timeout-seconds)",
        checks.int_in(30, 86400),
    ),
    Setting(
        "vllm_engine_ready_timeout",
        None,
        "seconds vLLM waits for its engine to load and get ready (VLLM_ENGINE_READY_TIMEOUT_S, vLLM >= 0.14; "
        "default: vllm_start_timeout, where vLLM's own is 600)",
        checks.optional(checks.int_in(60, 86400)),
    ),
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
    "--data-parallel-size": "vllm_data_parallel_size",
    "-dp": "vllm_data_parallel_size",
    "--enable-expert-parallel": "vllm_enable_expert_parallel",
    "-ep": "vllm_enable_expert_parallel",
    "--speculative-config": "vllm_speculative_config",
    # vLLM 0.22's shorthands for speculative-config fields.
    "--spec-method": "vllm_speculative_config",
    "--spec-model": "vllm_speculative_config",
    "--spec-tokens": "vllm_speculative_config",
    "--kv-cache-dtype": "vllm_kv_cache_dtype",
    # A replica group's flags (glmfleet/groups.py renders them per rank).
    "--nnodes": "vllm_group",
    "--node-rank": "vllm_group_rank",
    "--master-addr": "vllm_group_address",
    "--master-port": "vllm_group_master_port",
    "--headless": "vllm_group_rank",
    "--data-parallel-size-local": "vllm_group",
    "--data-parallel-start-rank": "vllm_group_rank",
    "--data-parallel-address": "vllm_group_address",
    "--data-parallel-rpc-port": "vllm_group_rpc_port",
    "--data-parallel-hybrid-lb": "vllm_group",
    "--distributed-timeout-seconds": "vllm_group_join_timeout",
    "--chat-template-content-format": "vllm_chat_template_content_format",
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
    # A config file can set any flag, the API key included: what it sets is unknowable here.
    "--config": "the keys glmfleet reads (vllm_extra_args take the flags themselves)",
}
# vLLM's own flags that begin another's name: argparse takes an exact name before a prefix.
FLAGS_NAMED_LIKE_A_PREFIX = {"--chat-template"}
# Variables glmfleet sets itself, or that hold secrets and belong in the secret keys.
ENV_KEYS = {
    "VLLM_API_KEY": "vllm_api_key",
    "HF_TOKEN": "hf_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_token",
    "HF_HUB_OFFLINE": "model_source",
    "HF_HOME": "vllm_state_dir",
    "VLLM_CACHE_ROOT": "vllm_state_dir",
    "HOME": "vllm_state_dir",
    "VLLM_ENGINE_READY_TIMEOUT_S": "vllm_engine_ready_timeout",
    "VLLM_HOST_IP": "vllm_group_address",
    "NCCL_SOCKET_IFNAME": "vllm_group_interface",
    "GLOO_SOCKET_IFNAME": "vllm_group_interface",
}


def as_vllm_reads(arg: str) -> str | None:
    """The flag an argument names as vLLM's parser reads it (``FlexibleArgumentParser``: ``_``
    and ``-`` alike in a long name up to its first ``.``, ``--name=value`` as ``--name``), or
    None for a value."""
    if arg.startswith("--"):
        name = arg[2:].split("=", 1)[0]
        head, dot, tail = name.partition(".")
        return "--" + head.replace("_", "-") + dot + tail
    if re.fullmatch(r"-[A-Za-z]{1,3}", arg.split("=", 1)[0]):
        return arg.split("=", 1)[0]
    return None


def guarded_flag(arg: str) -> str | None:
    """The flag of ``FLAG_KEYS`` an argument would set in vLLM, also abbreviated (argparse
    takes any unambiguous prefix of a long flag) or as ``--flag.key`` (a JSON flag's part)."""
    flag = as_vllm_reads(arg)
    if flag is None:
        return None
    base = flag.split(".", 1)[0]
    if base in FLAG_KEYS:
        return base
    if base.startswith("--") and len(base) > 3 and base not in FLAGS_NAMED_LIKE_A_PREFIX:
        return next((guarded for guarded in FLAG_KEYS if guarded.startswith(base)), None)
    return None


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    found = []
    for arg in cfg["vllm_extra_args"]:
        flag = guarded_flag(arg)
        if flag is not None:
            spelled = arg.split("=", 1)[0]
            found.append(
                f"vllm_extra_args contains {spelled!r}"
                + (f" (vLLM reads it as {flag!r})" if spelled != flag else "")
                + f"; set {FLAG_KEYS[flag]} instead"
                + (" (a key on the command line is visible to every user)" if flag == "--api-key" else "")
            )
    for name in cfg["vllm_env"]:
        if name in ENV_KEYS:
            found.append(f"vllm_env sets {name}; set {ENV_KEYS[name]} instead")
    if not checks.is_loopback(cfg["vllm_host"]) and not cfg["vllm_api_key"] and not cfg["vllm_allow_unauthenticated"]:
        found.append(
            f"vllm_host = {cfg['vllm_host']!r} serves every client that reaches the port, and vllm_api_key is "
            "not set: set vllm_api_key, or vllm_allow_unauthenticated: true if the network is trusted"
        )
    return found


def served_model_name(cfg: HostConfig) -> str:
    return cfg.vllm_served_model_name or cfg.model


def drains_on_stop(cfg: HostConfig) -> bool:
    """vLLM finishes in-flight requests on SIGTERM from 0.18 on (``--shutdown-timeout``)."""
    return Version(cfg.vllm_version).release >= (0, 18)


def vllm_command(cfg: HostConfig, generation: str | None = None, group: ReplicaGroup | None = None) -> list[str]:
    """The unit's ExecStart, as an argv: ``vllm serve`` with the configured flags, from the venv
    or inside the container; ``generation``: the host's GPU generation, where known; ``group``:
    the replica group the host is a rank of."""
    if cfg.vllm_runtime == "image":
        return [*docker_run(cfg), "serve", *serve_args(cfg, generation, group)]
    return [venv_bin(cfg, "vllm"), "serve", *serve_args(cfg, generation, group)]


def kv_cache_dtype(cfg: HostConfig, generation: str | None) -> str | None:
    """The configured KV-cache dtype, else the catalog's for the host's GPU generation."""
    if cfg.vllm_kv_cache_dtype:
        return cfg.vllm_kv_cache_dtype
    entry = catalog.find(cfg.model)
    return entry.kv_cache_dtype.get(generation) if entry is not None and generation else None


def serve_args(cfg: HostConfig, generation: str | None = None, group: ReplicaGroup | None = None) -> list[str]:
    """What follows ``vllm serve``: the model and the configured flags, and this host's rank of
    its replica group."""
    argv = [
        model_dir(cfg),
        "--host",
        cfg.vllm_host,
        "--port",
        str(cfg.vllm_port),
        "--served-model-name",
        served_model_name(cfg),
        "--tensor-parallel-size",
        str(cfg.vllm_tensor_parallel_size),
        "--gpu-memory-utilization",
        str(cfg.vllm_gpu_memory_utilization),
    ]
    if cfg.vllm_pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(cfg.vllm_pipeline_parallel_size)]
    if cfg.vllm_data_parallel_size > 1:
        argv += ["--data-parallel-size", str(cfg.vllm_data_parallel_size)]
    if cfg.vllm_enable_expert_parallel:
        argv.append("--enable-expert-parallel")
    if cfg.vllm_speculative_config:
        argv += ["--speculative-config", json.dumps(cfg.vllm_speculative_config, separators=(",", ":"))]
    dtype = kv_cache_dtype(cfg, generation)
    if dtype:
        argv += ["--kv-cache-dtype", dtype]
    if cfg.vllm_chat_template_content_format:
        argv += ["--chat-template-content-format", cfg.vllm_chat_template_content_format]
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
    if group is not None and group.size > 1:
        argv += [*group.serve_args(cfg.host), "--distributed-timeout-seconds", str(cfg.vllm_group_join_timeout)]
    return argv + list(cfg.vllm_extra_args)


def reads_engine_ready_timeout(cfg: HostConfig) -> bool:
    """Whether the vLLM release reads VLLM_ENGINE_READY_TIMEOUT_S: left out elsewhere, where it
    would only draw vLLM's "unknown variable" warning (a stand-in package is assumed current)."""
    release = compat.vllm_release(cfg)
    return release is None or bool(catalog.vllm_facts().reads_env("VLLM_ENGINE_READY_TIMEOUT_S", release))


def vllm_environment(cfg: HostConfig, group: ReplicaGroup | None = None) -> dict[str, str]:
    """The unit's EnvironmentFile: caches on persistent paths, secrets, a rank's network, and
    ``vllm_env``."""
    env = {
        "HOME": cfg.vllm_state_dir,
        **state_subdirs(cfg.vllm_state_dir),
        # The weights are fetched and verified by the model_weights role: vLLM only reads them.
        "HF_HUB_OFFLINE": "1",
        # A fleet's servers do not report usage to third parties.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if reads_engine_ready_timeout(cfg):
        env["VLLM_ENGINE_READY_TIMEOUT_S"] = str(cfg.vllm_engine_ready_timeout or cfg.vllm_start_timeout)
    if group is not None and group.size > 1:
        env.update(group.environment(cfg.host, cfg.vllm_group_interface))
        # Every rank's environment names the whole group's settings: a change to any rank restarts
        # every rank in the same run (vLLM's ranks do not rejoin a restarted head by themselves).
        env["GLMFLEET_GROUP_REVISION"] = group.revision
    if cfg.vllm_api_key:
        env["VLLM_API_KEY"] = cfg.vllm_api_key
    env.update(cfg.vllm_env)
    return env


def render_env_file(env: dict[str, str], runtime: str = "venv") -> str:
    """The environment file: systemd's quoted ``KEY="value"`` for the venv's unit, Docker's
    ``--env-file`` lines (``KEY=value``, taken literally) for the container."""
    line = filesyntax.docker_env_line if runtime == "image" else filesyntax.systemd_env_line
    return (
        "\n".join(["# Managed by glmfleet. Root-only: it holds secrets.", *(line(k, v) for k, v in env.items())]) + "\n"
    )


def service_question(cfg: HostConfig) -> Question:
    """The ManagedPaths fact of what this role writes and what the running service was started
    from (the flag check reads the unit's sha256 from it too, so the host is asked once)."""
    paths = [SECRETS_DIR, ENV_FILE, UNIT_PATH, STAGING_DIR]
    if cfg.vllm_runtime == "venv":
        paths.append(current_link(cfg.vllm_venv_root))
    return Question(ManagedPaths, {"paths": paths, "units": [UNIT]})


def questions(cfg: HostConfig) -> dict[str, Question]:
    return {"managed": service_question(cfg), "gpu": gpu_question(cfg)}


def render_unit(cfg: HostConfig, generation: str | None = None, group: ReplicaGroup | None = None) -> str:
    return get_template(str(TEMPLATE)).render(
        runtime=cfg.vllm_runtime,
        container=CONTAINER,
        served_model_name=filesyntax.systemd_text(served_model_name(cfg)),
        user=VLLM_USER,
        state_dir=filesyntax.systemd_word(cfg.vllm_state_dir),
        env_file=ENV_FILE,
        exec_start=filesyntax.systemd_command_line(vllm_command(cfg, generation, group)),
        # A headless rank whose engine died may exit with status 0 (vLLM's run_headless returns).
        restart="always" if group is not None and cfg.host not in group.endpoints() else "on-failure",
        exec_start_pre=filesyntax.systemd_command_line(weights_check_argv(cfg)),
        restart_sec=15,
        start_timeout=cfg.vllm_start_timeout,
        stop_timeout=cfg.vllm_shutdown_timeout + 30,
        # docker stop's own grace, inside systemd's: the container is killed before the unit is.
        container_stop_timeout=cfg.vllm_shutdown_timeout + 15,
        writable_paths=[filesyntax.systemd_word(cfg.vllm_state_dir)],
    )


def restart_command(cfg: HostConfig) -> str:
    """(Re)start the service; a start systemd refuses (a failed ExecStartPre, a unit it cannot
    load) fails the host with systemd's own words and the journal's last lines. reset-failed
    clears the start limit a crash loop before this deploy may have hit."""
    unit = quote(UNIT)
    journal = journal_tail(UNIT, cfg.verify_journal_lines)
    return (
        f"systemctl reset-failed {unit} 2>/dev/null; systemctl restart {unit} || "
        f"{{ systemctl status --no-pager --lines 0 {unit} >&2; echo {quote(f'--- last lines of the {UNIT} journal:')} >&2; "
        f"{journal} >&2; exit 1; }}"
    )


def install_unit_command() -> str:
    """Put the staged unit in place only once systemd itself accepts it (``systemd-analyze
    verify``: quoting, keys, executables): a unit systemd cannot load never replaces one that works."""
    staged, new = quote(STAGED_UNIT), quote(f"{UNIT_PATH}.glmfleet-new")
    return (
        f"systemd-analyze verify {staged} && install -o root -g root -m 644 {staged} {new} && "
        f"mv -f {new} {quote(UNIT_PATH)}"
    )


def started_before_its_files(managed: dict, cfg: HostConfig) -> bool:
    """Whether the running service started before its unit, environment or venv last changed:
    it runs something other than what is on disk (a restart that failed, a hand edit)."""
    started = managed["units"].get(UNIT, {}).get("started")
    changed = [managed["mtimes"].get(path) for path in service_question(cfg).kwargs["paths"] if path != STAGING_DIR]
    return started is not None and any(mtime is not None and mtime > started for mtime in changed)


# Ranks restarted together start within seconds of each other; a head that systemd brought back
# after a crash starts at least RestartSec (15 s) after them.
GROUP_START_SLACK_S = 10


def started_before_its_head(state: dict, group: ReplicaGroup) -> bool:
    """A rank that started before its group's head runs did (a head that crashed and came back):
    vLLM's ranks wait on the head they joined and never rejoin, so the rank restarts."""
    if host.name == group.head or state.get("started") is None:
        return False
    head = ask(host.inventory.get_host(group.head), ManagedPaths, paths=[], units=[UNIT])
    head_started = head["units"].get(UNIT, {}).get("started")
    return head_started is not None and head_started > state["started"] + GROUP_START_SLACK_S


@deploy("vLLM service")
@documented(SETTINGS)
def vllm_service(restart_when=()):
    """
    Write the vLLM unit and its root-only environment file, and keep the service running what
    they say.

    + restart_when: operations (e.g. the venv switch) whose change also needs a restart

    The unit replaces the installed one only once ``systemd-analyze verify`` accepts it;
    daemon-reload runs when the unit changed or systemd holds an older copy; drop-ins under
    ``vllm.service.d`` (glmfleet writes none) are removed and named. A stopped service starts,
    and a running one restarts when its unit, its environment, a drop-in or ``restart_when``
    changed, or when it started before its files last changed; a (re)start systemd refuses
    fails the host with systemd's words and the journal. Returns the (re)start, for the
    verify role, or None where the service runs what is on disk and nothing changes: a
    converged host plans no operation at all.
    """
    cfg = host_config(host)
    group = replica_group(host)
    answers = ask_together(host, questions(cfg))
    managed = answers["managed"]
    state = managed["units"].get(UNIT, {})
    was_active = state.get("running", False)

    directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")
    env = upload(
        managed,
        ENV_FILE,
        render_env_file(vllm_environment(cfg, group), cfg.vllm_runtime),
        mode="600",
        name=f"environment file {ENV_FILE}",
        secret=True,
    )
    unit = None
    rendered = render_unit(cfg, gpu_generation(answers["gpu"]), group)
    if managed["paths"].get(UNIT_PATH, {}).get("sha256") != hashlib.sha256(rendered.encode()).hexdigest():
        directory(managed, STAGING_DIR, name="glmfleet staging dir")
        files.put(
            name=f"unit {UNIT} staged", src=StringIO(rendered), dest=STAGED_UNIT, user="root", group="root", mode="644"
        )
        unit = server.shell(name=f"unit {UNIT}", commands=[install_unit_command()])
    foreign = state.get("dropins", [])
    dropins = (
        server.shell(
            name=f"remove drop-ins glmfleet did not write: {' '.join(foreign)}", commands=[f"rm -f -- {join(foreign)}"]
        )
        if foreign
        else None
    )
    if unit or dropins or state.get("need_reload"):
        systemd.daemon_reload(name="systemd daemon-reload")
    unit_enabled(managed, UNIT)
    changed = planned(env, unit, dropins, *restart_when)
    stale = was_active and (
        state.get("need_reload")
        or started_before_its_files(managed, cfg)
        or (group is not None and started_before_its_head(state, group))
    )
    if was_active and not changed and not stale:
        return None
    return server.shell(
        name=f"(re)start {UNIT}",
        commands=[restart_command(cfg)],
        _if=[any_changed(*changed)] if was_active and not stale else [],
    )

"""Where glmfleet puts things on a host: every path and name it writes, reads or runs, in one
place, with the small helpers that derive one from the configuration. No other module spells a
host path; roles import the ones they touch from here, never from each other.

Ownership, which the security rules rest on (README, "Security"):

- root-only, 0700: ``SECRETS_DIR`` and everything in it (env files, tokens, netrc, keys);
- root's, world-readable: the tools (``TOOLS_ROOT``), glmfleet's state (``STATE_ROOT``), the
  venvs and the model store (``model_root``): the service user reads them and writes none;
- the service user's: only ``vllm_state_dir`` (its home: caches). Root never creates, changes or
  follows anything below it; what must exist there is made as the service user.
"""

from __future__ import annotations

import hashlib
import json
from posixpath import relpath

# --- the service ---------------------------------------------------------------------------------

VLLM_USER = "vllm"
NOLOGIN = "/usr/sbin/nologin"
UNIT = "vllm.service"
UNIT_DIR = "/etc/systemd/system"
UNIT_PATH = f"{UNIT_DIR}/{UNIT}"
# The unit as rendered, checked by systemd-analyze verify before it replaces the installed one.
STAGED_UNIT = f"/var/lib/glmfleet/staging/{UNIT}"
CONTAINER = "vllm"  # the image runtime's container name
DOCKER = "/usr/bin/docker"
CDI_SPEC = "/etc/cdi/nvidia.yaml"  # written by the container toolkit; how the container gets the GPUs

# --- root-only secrets ---------------------------------------------------------------------------

SECRETS_DIR = "/etc/glmfleet"
ENV_FILE = f"{SECRETS_DIR}/vllm.env"  # the unit's environment: the API key among it
HUB_ENV_FILE = f"{SECRETS_DIR}/hub.env"  # the hub CLIs' environment: token, endpoint
NETRC = f"{SECRETS_DIR}/netrc"  # credentials of package indexes and key URLs, out of every argv
PEER_KEY = f"{SECRETS_DIR}/peer_ed25519"  # the fleet's transfer key (private)
PEER_KNOWN_HOSTS = f"{SECRETS_DIR}/peer_known_hosts"
# ssh's control sockets (ControlPath) of a fan-out's copies: one connection to each peer, kept
# between files (a new one cost 0.34 s a file, a session on a kept one 0.09 s: benchmarks/RESULTS.md).
PEER_CONNECTIONS = f"{SECRETS_DIR}/peer-%C"
KNOWN_GOOD_DIR = f"{SECRETS_DIR}/known-good"  # a rollout's copy of what last served (holds the env file)
KNOWN_GOOD_UNIT = f"{KNOWN_GOOD_DIR}/{UNIT}"
KNOWN_GOOD_ENV = f"{KNOWN_GOOD_DIR}/vllm.env"
KNOWN_GOOD_VENV = f"{KNOWN_GOOD_DIR}/venv"

# --- glmfleet's tools and state ----------------------------------------------------------------

TOOLS_ROOT = "/opt/glmfleet"
BIN_DIR = f"{TOOLS_ROOT}/bin"
SHARE_DIR = f"{TOOLS_ROOT}/share"
WEIGHTS_SCRIPT = f"{BIN_DIR}/glmfleet-weights"
VERIFY_SCRIPT = f"{BIN_DIR}/verify-vllm"
FLAGS_SCRIPT = f"{BIN_DIR}/check-vllm-flags"
GLM4_PATCH_SCRIPT = f"{BIN_DIR}/glm4-patch"
GLM4_PATCH = f"{SHARE_DIR}/glm4-0.8.4.patch"
STATE_ROOT = "/var/lib/glmfleet"
WEIGHTS_STATE_DIR = f"{STATE_ROOT}/weights"
# The configured directories glmfleet made (one path a line): only these it puts right when they drift.
MADE_DIRS_RECORD = f"{STATE_ROOT}/made-dirs"
IMAGE_ARCHIVE_DIR = f"{STATE_ROOT}/images"
PATCHED_GLM4_DIR = f"{STATE_ROOT}/glm4"
PATCHED_GLM4 = f"{PATCHED_GLM4_DIR}/glm4.py"  # laid over the image's own (image runtime, vLLM 0.8.4)
CACHE_ROOT = "/var/cache/glmfleet"
UV_CACHE_DIR = f"{CACHE_ROOT}/uv"
HUB_CLI_HOME = f"{CACHE_ROOT}/hub"
RSYNC = "/usr/bin/rsync"
ROOT_SSH_DIR = "/root/.ssh"
ROOT_AUTHORIZED_KEYS = f"{ROOT_SSH_DIR}/authorized_keys"
SSH_HOST_KEY_PUB = "/etc/ssh/ssh_host_ed25519_key.pub"  # a host's key, as its peers know it
DEFAULT_MODEL_ROOT = "/var/lib/glmfleet/models"  # model_root's default: the store peers may read
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's and Ubuntu's: pip and uv trust what the host trusts
STAGING_DIR = STAGED_UNIT.rsplit("/", 1)[0]


# --- apt, the driver -----------------------------------------------------------------------------

KEYRINGS_DIR = "/etc/apt/keyrings"
APT_SOURCES_DIR = "/etc/apt/sources.list.d"
APT_AUTH = "/etc/apt/auth.conf.d/glmfleet.conf"
NVIDIA_HOLD_CONF = "/etc/apt/apt.conf.d/51glmfleet-nvidia-hold"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/glmfleet-blacklist-nouveau.conf"
PERSISTENCED_DROPIN = "/etc/systemd/system/nvidia-persistenced.service.d/glmfleet.conf"
DOCKER_DAEMON_JSON = "/etc/docker/daemon.json"
DKMS_SIGNING_KEYS = ("/var/lib/dkms/mok.pub", "/var/lib/shim-signed/mok/MOK.der")
EFI_SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def apt_keyring(repo: str) -> str:
    return f"{KEYRINGS_DIR}/glmfleet-{repo}.asc"


def apt_source(repo: str) -> str:
    return f"{APT_SOURCES_DIR}/glmfleet-{repo}.sources"


# --- the gateway ---------------------------------------------------------------------------------

NGINX = "/usr/sbin/nginx"
NGINX_UNIT = "nginx.service"
NGINX_PID = "/run/nginx.pid"
NGINX_ERROR_LOG = "/var/log/nginx/error.log"
GATEWAY_CONFIG = "/etc/nginx/conf.d/glmfleet-gateway.conf"
GATEWAY_KEYS = "/etc/nginx/glmfleet-gateway-keys.conf"  # root-only, read by the nginx master
NGINX_DEFAULT_SITE = "/etc/nginx/sites-enabled/default"

# --- monitoring: Prometheus, its exporters, Grafana ---------------------------------------------
# The Debian and Ubuntu packages' own paths and units; each reads its flags from ARGS in its
# /etc/default file, which glmfleet writes before the package is installed (so its first start
# already listens where configured).

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS_UNIT = "prometheus.service"
PROMETHEUS_DEFAULTS = "/etc/default/prometheus"
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
PROMETHEUS_RULES_NAME = "glmfleet-alerts.yml"  # beside the configuration, which names it relatively
PROMETHEUS_RULES = f"/etc/prometheus/{PROMETHEUS_RULES_NAME}"
# Both as rendered, side by side (the rules named relatively), checked by promtool before they
# replace the installed ones.
STAGED_PROMETHEUS_CONFIG = f"{STAGING_DIR}/prometheus.yml"
STAGED_PROMETHEUS_RULES = f"{STAGING_DIR}/{PROMETHEUS_RULES_NAME}"
# The scrape targets, one file per job (file_sd): Prometheus re-reads a changed one by itself.
PROMETHEUS_TARGETS_DIR = "/etc/prometheus/glmfleet-targets"
PROMETHEUS_CONSOLE = "/etc/prometheus/consoles/glmfleet.html"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
NODE_EXPORTER_UNIT = "prometheus-node-exporter.service"
NODE_EXPORTER_DEFAULTS = "/etc/default/prometheus-node-exporter"
# glmfleet's own gauges, read by the node exporter's textfile collector: root's, not in Debian's
# textfile directory, which lies in the prometheus user's home (root follows no link it could plant).
NODE_EXPORTER_TEXTFILES = f"{STATE_ROOT}/node-exporter"
GPUS_EXPECTED = f"{NODE_EXPORTER_TEXTFILES}/glmfleet-gpus.prom"
NGINX_EXPORTER = "/usr/bin/prometheus-nginx-exporter"
NGINX_EXPORTER_UNIT = "prometheus-nginx-exporter.service"
NGINX_EXPORTER_DEFAULTS = "/etc/default/prometheus-nginx-exporter"
# nginx's stub_status page for the exporter, on loopback (a unix socket left behind by a killed
# nginx would keep nginx from starting again).
NGINX_STATUS_CONFIG = "/etc/nginx/conf.d/glmfleet-status.conf"
DCGM_UNIT = "nvidia-dcgm.service"
DCGM_EXPORTER = "/usr/bin/dcgm-exporter"
DCGM_EXPORTER_UNIT = "nvidia-dcgm-exporter.service"
DCGM_EXPORTER_DROPIN = f"{UNIT_DIR}/{DCGM_EXPORTER_UNIT}.d/glmfleet.conf"
DCGM_COUNTERS = "/etc/dcgm-exporter/glmfleet-counters.csv"
# Keeps the CUDA repository's driver packages away from a host whose driver comes from elsewhere.
CUDA_DRIVER_PIN = "/etc/apt/preferences.d/glmfleet-cuda-repository"
GRAFANA_UNIT = "grafana-server.service"
GRAFANA_DROPIN = f"{UNIT_DIR}/{GRAFANA_UNIT}.d/glmfleet.conf"
GRAFANA_DATASOURCES = "/etc/grafana/provisioning/datasources/glmfleet.yaml"
GRAFANA_DASHBOARD_PROVIDER = "/etc/grafana/provisioning/dashboards/glmfleet.yaml"
# vLLM's dashboards, fetched: root's (not in /var/lib/grafana, the grafana user's), one
# directory per list of dashboard URLs, so that a changed list leaves no dashboard behind.
GRAFANA_DASHBOARDS_ROOT = f"{STATE_ROOT}/grafana-dashboards"

# Directories glmfleet owns by name: it makes them, and puts their owner and mode right when
# they drift. Configured directories (venv root, state dir, model store) are made once and
# never changed afterwards (``operations.owned_directory``).
OWN_DIRS = (
    SECRETS_DIR,
    TOOLS_ROOT,
    BIN_DIR,
    SHARE_DIR,
    STATE_ROOT,
    WEIGHTS_STATE_DIR,
    CACHE_ROOT,
    STAGING_DIR,
    PROMETHEUS_TARGETS_DIR,
    NODE_EXPORTER_TEXTFILES,
    GRAFANA_DASHBOARDS_ROOT,
)

# --- the official image --------------------------------------------------------------------------

IMAGE_GLM4 = "/usr/local/lib/python3.12/dist-packages/vllm/model_executor/models/glm4.py"

# --- derived from the configuration ------------------------------------------------------------


def tool_dir(package: str, version: str) -> str:
    """A small pinned CLI's own venv (uv, hf, modelscope)."""
    return f"{TOOLS_ROOT}/{package}-{version}"


def tool_bin(package: str, version: str, command: str) -> str:
    return f"{tool_dir(package, version)}/bin/{command}"


def venvs_dir(venv_root: str) -> str:
    return f"{venv_root}/venvs"


def venv_dir(venv_root: str, name: str) -> str:
    return f"{venvs_dir(venv_root)}/{name}"


COMPLETE_MARKER = ".glmfleet-complete"  # in a venv: written last, once its vllm imports


def current_link(venv_root: str) -> str:
    return f"{venv_root}/current"


def current_bin(venv_root: str, command: str) -> str:
    """A program of the venv in use, through the ``current`` link that switches and rollbacks move."""
    return f"{venv_root}/current/bin/{command}"


def state_subdirs(state_dir: str) -> dict[str, str]:
    """The caches in the service user's home (made by the service user, never by root)."""
    return {"HF_HOME": f"{state_dir}/huggingface", "VLLM_CACHE_ROOT": f"{state_dir}/cache"}


def model_dir(cfg) -> str:
    """The directory vLLM serves the weights from: ``model_dir``, or the revision's place in the
    model store, ``<model_root>/<owner>--<name>/<commit>``."""
    return cfg.model_dir or f"{cfg.model_root}/{cfg.model.replace('/', '--')}/{cfg.model_revision}"


def model_incoming_dir(cfg) -> str:
    """Where copies of the model's files land before they are verified (the host script's INCOMING)."""
    return f"{model_dir(cfg)}/.glmfleet/incoming"


def model_dir_in_store(cfg) -> str | None:
    """The model directory relative to the model store, as a peer asks its give for it (None: outside)."""
    directory = model_dir(cfg)
    if directory.startswith(cfg.model_root.rstrip("/") + "/"):
        return relpath(directory, cfg.model_root)
    return None


def weights_state_file(cfg) -> str:
    return f"{WEIGHTS_STATE_DIR}/{model_dir(cfg).strip('/').replace('/', '-')}.json"


def weights_selection_key(cfg) -> str:
    """What a completion mark is valid for: the same directory holding another model, revision or
    file selection is not complete."""
    identity = json.dumps([cfg.model, cfg.model_revision, sorted(cfg.model_include), sorted(cfg.model_exclude)])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def weights_state_args(cfg) -> list[str]:
    return ["--dir", model_dir(cfg), "--state", weights_state_file(cfg), "--key", weights_selection_key(cfg)]


def weights_check_argv(cfg) -> list[str]:
    """For the vLLM unit's ExecStartPre: fails unless this revision is complete on the host."""
    return [WEIGHTS_SCRIPT, "check", *weights_state_args(cfg)]


def local_url(listen_address: str, port: int) -> str:
    """Where the host itself reaches a server listening there: a wildcard address means loopback."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_address, listen_address)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}"

"""The roles, in the order deploy.py applies them; each module declares its SETTINGS and the
facts it reads (``questions``)."""

import threading
from weakref import WeakSet

from pyinfra import host

from glmfleet import config
from glmfleet.config import host_config, validate_inventory
from glmfleet.facts.engine import ask_together
from glmfleet.operations import planned
from glmfleet.role import deploy_function
from roles import (
    container_toolkit,
    dcgm_exporter,
    gateway,
    gateway_exporter,
    glm4_patch,
    grafana,
    model_weights,
    node_exporter,
    nvidia_driver,
    preflight,
    prometheus,
    site_credentials,
    verify,
    vllm_flags,
    vllm_image,
    vllm_service,
    vllm_venv,
)

SERVING_ROLES = (
    preflight,
    site_credentials,
    nvidia_driver,
    container_toolkit,
    vllm_venv,
    vllm_image,
    glm4_patch,
    model_weights,
    vllm_flags,
    vllm_service,
    verify,
)
# What watches the fleet, in order: exporters on every host of a monitored fleet, Prometheus (and
# Grafana) on the hosts of the `monitoring` group (``monitoring_roles``).
MONITORING_ROLES = (node_exporter, dcgm_exporter, gateway_exporter, prometheus, grafana)
ROLES = (*SERVING_ROLES, gateway, *MONITORING_ROLES)
config.use_roles(ROLES)
# What a rollout prepares while the host still serves (serving_host's stage_only).
STAGING_ROLES = (preflight, vllm_venv, vllm_image, model_weights, vllm_flags)


_PREPARED: WeakSet = WeakSet()  # the runs (pyinfra States) whose control node work is done
# pyinfra loads deploy.py for several hosts side by side (gevent); under its monkey patching this
# lock makes the others wait while the first does the work, which runs subprocesses.
_PREPARING = threading.Lock()


def prepare_control_node(inventory) -> None:
    """Each role's work on the control node (``prepare``: the transfer key, manifests of control
    directories), once per run and before any host is planned: nothing runs here while
    pyinfra plans."""
    state = getattr(inventory, "state", None)
    with _PREPARING:
        if state is not None and state in _PREPARED:
            return
        configs = validate_inventory(inventory)
        for role in ROLES:
            if hasattr(role, "prepare"):
                role.prepare(configs)
        if state is not None:
            _PREPARED.add(state)


def ask_roles(roles) -> None:
    """Ask the host everything ``roles`` will read, in one command (``facts.engine.ask_together``)."""
    cfg = host_config(host)
    ask_together(
        host,
        {
            f"{role.__name__}.{name}": question
            for role in roles
            if hasattr(role, "questions")
            for name, question in role.questions(cfg).items()
        },
    )


def serving_host(stage_only=False):
    """The roles that take one host to verified serving, in order: what deploy.py applies to
    every host and a rollout to each batch.

    With stage_only, only what is slow to prepare beside the running service and what can fail
    before it is touched: the venv built without switching to it, the image pulled, the flags
    checked, the weights fetched. A rollout stages while the host still serves. Returns the operations whose timing
    a rollout reports, (the restart, the check that the host serves), each None where it is
    not planned (a host that serves and where nothing changes plans neither); or None where
    nothing starts: when staging, and on a host waiting for its reboot into a new driver.
    """
    ask_roles(STAGING_ROLES if stage_only else SERVING_ROLES)
    preflight.preflight()
    site_credentials.site_credentials()
    if stage_only:
        vllm_venv.vllm_venv(switch=False)
        vllm_image.vllm_image()
        model_weights.model_weights()
        vllm_flags.vllm_flags()
        return None
    driver = nvidia_driver.nvidia_driver()
    toolkit_changed = container_toolkit.container_toolkit(driver=driver)
    runtime_changed = [*vllm_venv.vllm_venv(switch=False), *vllm_image.vllm_image(), *glm4_patch.glm4_patch()]
    # Weights need no GPU: they are fetched even on a host that waits for its reboot. A host whose
    # weights fail to complete fails here, so its vLLM is never started.
    new_weights = model_weights.model_weights()
    # A bad flag fails the host here, before the new venv becomes `current` and the unit is replaced.
    vllm_flags.vllm_flags()
    runtime_changed += vllm_venv.vllm_venv_switch()
    # Serving needs the GPU: a host waiting for its reboot into the new driver stops here.
    if not driver.ready:
        return None
    started = vllm_service.vllm_service(
        restart_when=[*runtime_changed, *new_weights, *toolkit_changed, *driver.changes]
    )
    return started, verify.verify(changes=planned(started))


def monitoring_roles(member) -> tuple:
    """The monitoring roles that apply to a host: none where the inventory has no
    ``monitoring`` group; else the node exporter and (on GPU hosts, ``dcgm_exporter.enabled``)
    DCGM everywhere, the gateway's exporter on gateways, Prometheus and Grafana on the
    ``monitoring`` hosts."""
    if not prometheus.monitored(member.inventory):
        return ()
    applied = [node_exporter, dcgm_exporter]
    if gateway.GATEWAY_GROUP in member.groups:
        applied.append(gateway_exporter)
    if prometheus.MONITORING_GROUP in member.groups:
        applied += [prometheus, grafana]
    return tuple(applied)


def monitoring_host(applied: tuple) -> None:
    """Apply the monitoring roles ``monitoring_roles`` chose for this host, in their order."""
    for role in applied:
        deploy_function(role)()

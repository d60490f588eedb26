"""glmfleet's deploy: bare GPU hosts to verified vLLM serving. Run `pyinfra INVENTORY deploy.py`.

Every host's configuration is validated before any operation is planned, so one bad value in
the inventory, group_data/ or --data stops the whole run with nothing changed. Hosts of the
`gateway` group also run the fleet's gateway; where the inventory has a `monitoring` group, every
host runs the exporters and the `monitoring` hosts Prometheus. `glmfleet rollout` applies the
serving roles in health-gated batches.
"""

from pyinfra import host, inventory, state

from glmfleet.config import validate_inventory
from glmfleet.connection import report_lost_connections, without_nagle
from roles import (
    SERVING_ROLES,
    ask_roles,
    gateway,
    monitoring_host,
    monitoring_roles,
    prepare_control_node,
    serving_host,
)
from roles.gateway import GATEWAY_GROUP

validate_inventory(inventory)
prepare_control_node(inventory)  # the control node's own work, before any host is planned
without_nagle(host)
report_lost_connections(state)  # a host lost mid-run is named with the cause

on_gateway = GATEWAY_GROUP in host.groups
watching = monitoring_roles(host)
ask_roles(SERVING_ROLES + ((gateway,) if on_gateway else ()) + watching)  # one command per host for every role's facts
serving_host()
if on_gateway:
    gateway.gateway()
monitoring_host(watching)

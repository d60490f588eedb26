"""glmfleet's deploy: bare GPU hosts to verified vLLM serving. Run `pyinfra INVENTORY deploy.py`.

Every host's configuration is validated before any operation is planned, so one bad value in
the inventory, group_data/ or --data stops the whole run with nothing changed. Hosts of the
`gateway` group also run the fleet's gateway. `glmfleet rollout` applies the same roles in
health-gated batches.
"""

from pyinfra import host, inventory

from glmfleet.config import validate_inventory
from glmfleet.connection import without_nagle
from roles import serving_host
from roles.gateway import GATEWAY_GROUP, gateway

validate_inventory(inventory)
without_nagle(host)

serving_host()
if GATEWAY_GROUP in host.groups:
    gateway()

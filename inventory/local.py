"""pyinfra inventory: the local test fleet's hosts that are up (`make fleet-up`)."""

import os

from devfleet.localfleet import inventory_hosts

# Secrets come from the environment, as in prod.py: never from this file or --data.
local_fleet = (inventory_hosts(), {"vllm_api_key": os.environ.get("GLMFLEET_VLLM_API_KEY")})

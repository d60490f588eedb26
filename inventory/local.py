"""pyinfra inventory: the local test fleet's hosts that are up (`make fleet-up`)."""

from glmfleet.localfleet import inventory_hosts

local_fleet = inventory_hosts()

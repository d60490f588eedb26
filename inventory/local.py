"""pyinfra inventory: the local test fleet's hosts that are up (`make fleet-up`)."""

from glmfleet.localfleet import load_hosts

local_fleet = [
    (
        host["name"],
        {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": host["ssh_port"],
            "ssh_user": "root",
            "ssh_key": host["ssh_key"],
            # Each host's key is known from its creation: check it strictly.
            "ssh_known_hosts_file": host["known_hosts"],
            "ssh_strict_host_key_checking": "yes",
        },
    )
    for host in load_hosts()
]

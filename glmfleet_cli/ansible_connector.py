"""`pyinfra @ansible/path/to/hosts.yml deploy.py`: an Ansible inventory as a pyinfra inventory.

A pyinfra inventory connector (registered in pyproject.toml, pyinfra.connectors), so that every
command that takes an inventory takes one: `pyinfra`, `glmfleet rollout`, `status` and `logs`.
The hosts it yields connect over pyinfra's SSH connector. It stands with the commands: what is
glmfleet's in the inventory is known from the roles' settings.
"""

from __future__ import annotations

import copy
import functools

from pyinfra.connectors.base import BaseConnector

import roles  # noqa: F401  (hands the roles' settings to the configuration model)
from glmfleet.ansible_inventory import pyinfra_hosts


@functools.cache
def _hosts(source: str) -> list:
    # pyinfra's CLI makes a throwaway inventory before the real one: read the inventory once.
    return pyinfra_hosts(source)


class AnsibleInventoryConnector(BaseConnector):
    """Hosts, groups and variables of an Ansible inventory (a file or a directory), as
    ansible-core resolves them; vault passwords as Ansible takes them
    (ANSIBLE_VAULT_PASSWORD_FILE, ANSIBLE_VAULT_IDENTITY_LIST, ansible.cfg)."""

    handles_execution = False  # its hosts run over pyinfra's @ssh connector

    @staticmethod
    def make_names_data(name=None):
        if not name:
            raise ValueError("@ansible needs the Ansible inventory: @ansible/PATH (a file or a directory)")
        for host, data, groups in _hosts(name):
            # pyinfra updates the data it is given in place: each inventory gets its own.
            yield host, copy.deepcopy(data), list(groups)

    # An inventory connector only: pyinfra never runs commands through it.
    def run_shell_command(self, *args, **kwargs):
        raise NotImplementedError

    def put_file(self, *args, **kwargs):
        raise NotImplementedError

    def get_file(self, *args, **kwargs):
        raise NotImplementedError

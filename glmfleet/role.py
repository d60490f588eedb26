"""The one contract every role keeps (roles/, one module each): what it declares, what it reads,
and the deploy function that applies it. A role declares only what it has; the configuration
model and the deploy fill in the rest (``config``, ``roles.ask_roles``).

Required: the ``@deploy`` function named as the module. It plans the role's operations, each
only where the host's answers show something to change, so a converged host plans none.

What a role has, it declares so:

+ ``SETTINGS``: a tuple of ``config.Setting``, its data keys, declared once at the top of the
  module (default, meaning, check); ``config.documented`` adds them to the deploy function's
  docstring, as pyinfra documents an operation's arguments, and ``glmfleet keys`` lists them.
+ ``questions(cfg) -> dict[str, Question]``: what it reads from a host, by name; the deploy asks
  every role's questions in one command per host (``facts.engine.ask_together``) before any
  role plans, and the role reads its answers by the same names.
+ ``combination_problems(cfg, groups) -> list[str]``: values that are each valid but cannot
  work together, for a host in ``groups``; run with every host's validation, before any host
  is touched. Each message names the key, its value and the fix.
+ ``prepare(configs)``: work on the control node (a key, a manifest), once per run, before any
  host is planned (``roles.prepare_control_node``): nothing runs on the control node while
  pyinfra plans.
"""

from __future__ import annotations

from collections.abc import Callable


def deploy_function(role) -> Callable:
    """The role's ``@deploy`` function: the one named as its module."""
    return getattr(role, role.__name__.rsplit(".", 1)[-1])

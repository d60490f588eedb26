"""The `glmfleet` command and what it drives through pyinfra's API: rollout, status (the commands layer,
above the roles)."""

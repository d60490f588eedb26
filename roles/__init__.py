"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import gateway, verify, vllm_service, vllm_venv

ROLES = (vllm_venv, vllm_service, verify, gateway)


def serving_host(stage_only=False):
    """The roles that take one host to verified serving, in order: what deploy.py applies to
    every host and a rollout to each batch.

    With stage_only, only what is slow to prepare and leaves the running service alone (the
    venv build): a rollout stages while the host still serves. Returns the operations whose
    timing a rollout reports: (the restart, the check that the host serves).
    """
    venv_switched = vllm_venv.vllm_venv(switch=not stage_only)
    if stage_only:
        return None
    started = vllm_service.vllm_service(restart_when=venv_switched)
    return started[0], verify.verify(changes=started)

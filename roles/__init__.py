"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import verify, vllm_service, vllm_venv

ROLES = (vllm_venv, vllm_service, verify)

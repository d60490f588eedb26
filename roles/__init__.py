"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import model_weights, verify, vllm_service, vllm_venv

ROLES = (vllm_venv, model_weights, vllm_service, verify)

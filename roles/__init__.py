"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import glm4_patch, preflight, verify, vllm_flags, vllm_service, vllm_venv

ROLES = (preflight, vllm_venv, glm4_patch, vllm_flags, vllm_service, verify)

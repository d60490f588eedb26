"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import container_toolkit, model_weights, nvidia_driver, verify, vllm_image, vllm_service, vllm_venv

ROLES = (nvidia_driver, container_toolkit, vllm_venv, vllm_image, model_weights, vllm_service, verify)

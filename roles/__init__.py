"""The roles, in the order deploy.py applies them; each module declares its SETTINGS."""

from roles import (
    container_toolkit,
    glm4_patch,
    model_weights,
    nvidia_driver,
    preflight,
    verify,
    vllm_flags,
    vllm_image,
    vllm_service,
    vllm_venv,
)

ROLES = (preflight, nvidia_driver, container_toolkit, vllm_venv, vllm_image, glm4_patch, model_weights, vllm_flags, vllm_service,
         verify)

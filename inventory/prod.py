"""Example production inventory: copy it, list your GPU hosts, run `pyinfra inventory/prod.py deploy.py`.

Hosts are `(name, data)` tuples in groups; data set here wins over group_data/<group>.py, which
wins over group_data/all.py. Every key is documented in README.md ("Data keys").
Secrets: read them from the environment (or a vault), never write them into this file.
"""

import os

gpu_servers = [
    ("gpu-01.example.internal", {"vllm_tensor_parallel_size": 8}),
    ("gpu-02.example.internal", {"vllm_tensor_parallel_size": 8}),
]

gpu_servers_data = {
    "ssh_user": "ubuntu",
    "_sudo": True,
    "model": "zai-org/GLM-4-9B-0414",
    "vllm_version": "0.22.0",
    "vllm_host": "0.0.0.0",
    "vllm_max_model_len": 32768,
    "vllm_api_key": os.environ.get("GLMFLEET_VLLM_API_KEY"),
}

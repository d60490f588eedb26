"""Example production inventory: copy it, list your GPU hosts, run `pyinfra inventory/prod.py deploy.py`.

Hosts are names or `(name, data)` tuples in groups. Precedence, most specific first: --data, a
host's own data here, group_data/<group>.py, the group's data here, group_data/all.py, the roles'
defaults. Every key is documented in README.md ("Data keys").
Secrets: read them from the environment (or a vault), never write them into this file.
"""

import os

# A group is a list of hosts, or (hosts, data) where data applies to every host in it.
gpu_servers = (
    [
        ("gpu-01.example.internal", {"vllm_tensor_parallel_size": 8}),
        ("gpu-02.example.internal", {"vllm_tensor_parallel_size": 8}),
    ],
    {
        "ssh_user": "ubuntu",
        "_sudo": True,
        "model": "zai-org/GLM-4-9B-0414",
        # The commit every host fetches, verifies and serves: the one you tested (the repository's
        # history on the hub lists them). A placeholder here: the hub answers "not found" until set.
        "model_revision": "0000000000000000000000000000000000000000",
        "vllm_version": "0.22.0",
        "vllm_host": "0.0.0.0",
        "vllm_max_model_len": 32768,
        "vllm_api_key": os.environ.get("GLMFLEET_VLLM_API_KEY"),
    },
)

# The fleet's one OpenAI-compatible entry point: nginx on this host, in front of every host
# above (`glmfleet rollout` takes hosts out of its pool while it updates them). It checks
# vllm_api_key; it speaks plain HTTP, like vLLM itself: keep it on a trusted network.
gateway = (["gpu-01.example.internal"], {"gateway_listen_address": "0.0.0.0", "gateway_port": 8080})

# The fleet's Prometheus, with Grafana and vLLM's dashboards: every host above then also runs the
# node exporter and, where glmfleet manages the NVIDIA driver, DCGM's exporter (README: Monitoring).
monitoring = (["gpu-01.example.internal"], {"grafana": True})

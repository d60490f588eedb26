#!/usr/bin/env python3
"""Render, with glmfleet's own code, what the deploy would put on a GPU host for the smoke model.

Writes into OUT_DIR (nothing is retyped; every file comes from the roles' functions):

- ``argv.json``: ``roles.vllm_service.vllm_command(cfg)``, the unit's ExecStart as an argv
- ``vllm.env``: ``render_env_file(vllm_environment(cfg))``, the unit's EnvironmentFile, as written
- ``vllm.service``: ``render_unit(cfg)``, the whole unit, for the record
- ``verify_argv.json``: ``roles.verify.verify_argv(cfg)``, the verify step's command
- ``smoke.env``: shell variables smoke.sh reads (paths the roles chose: venv root and name,
  env file, verify script, state dir, service user, model dir, served name, port)
- ``switch.sh``: ``roles.vllm_venv.switch_command``, the role's own switch of ``current``
- ``import_check.py``: ``roles.vllm_venv.IMPORT_CHECK``, the role's check that the venv imports
- ``gpuhost_fact.sh``: ``glmfleet.facts.GpuHost().command()``, what the GPU fact runs on a host

Run it where glmfleet's dependencies (pyinfra) are installed: on the controller, as a real
deploy does, e.g. ``.venv/bin/python tests/gpu/render.py .gpu/rendered``. The GPU host only
consumes the files, as it only receives the unit and env file from pyinfra.

The smoke data (``SMOKE_DATA``) may be overridden with ``--data FILE.json``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL_DIR = "/opt/glmfleet/models/tiny-glm4"

# Everything else stays at the roles' defaults: the command is the one a fleet host would run.
SMOKE_DATA = {
    "model_dir": MODEL_DIR,
    # The smoke makes its model in place (make_tiny_glm.py): the weights role would only verify
    # it ('path'); a revision names that one checkpoint.
    "model_source": "path",
    "model_revision": "7e57" * 10,
    "vllm_served_model_name": "tiny-glm4",
    # vLLM 0.22 imports flashinfer for its top-k/top-p sampler on every CUDA start unless this is
    # 0; the smoke install leaves flashinfer (and its 1 GB of kernels) out, as a text model's
    # serve needs it for nothing else on Hopper (attention is FlashAttention 3).
    "vllm_env": {"VLLM_USE_FLASHINFER_SAMPLER": "0"},
}


def render(data: dict, out: Path) -> dict:
    from glmfleet import catalog
    from glmfleet.config import resolve
    from glmfleet.layout import COMPLETE_MARKER
    from roles import verify, vllm_service, vllm_venv

    cfg = resolve(data, "gpu-smoke")
    argv = vllm_service.vllm_command(cfg)
    env = vllm_service.vllm_environment(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
    env_text = vllm_service.render_env_file(env)
    (out / "vllm.env").write_text(env_text)
    (out / "vllm.env").chmod(0o600)
    (out / "vllm.service").write_text(vllm_service.render_unit(cfg))
    (out / "verify_argv.json").write_text(json.dumps(verify.verify_argv(cfg), indent=1) + "\n")
    name = vllm_venv.venv_name(cfg)
    (out / "switch.sh").write_text(vllm_venv.switch_command(cfg.vllm_venv_root, name, None) + "\n")
    (out / "import_check.py").write_text(vllm_venv.IMPORT_CHECK)
    from glmfleet.facts.gpu import GpuHost

    (out / "gpuhost_fact.sh").write_text(GpuHost().command() + "\n")  # the GPU fact's own command, for `smoke.sh facts`
    venv_bin = vllm_venv.venv_bin(cfg, "vllm")
    shell = {
        "VENV_ROOT": cfg.vllm_venv_root,
        "VENV_NAME": name,
        "VENV_CURRENT_BIN": venv_bin.rsplit("/", 1)[0],
        "COMPLETE_MARKER": COMPLETE_MARKER,
        "VLLM_PACKAGE": cfg.vllm_package,
        "VLLM_VERSION": cfg.vllm_version,
        "STATE_DIR": cfg.vllm_state_dir,
        "SERVICE_USER": vllm_venv.VLLM_USER,
        "ENV_FILE": vllm_service.ENV_FILE,
        "VERIFY_SCRIPT": verify.VERIFY_SCRIPT,
        "MODEL_DIR": cfg.model_dir or "",
        # The architecture of the tiny checkpoint make_tiny_glm.py makes: the catalog's for the model.
        "ARCHITECTURE": catalog.find(cfg.model).architecture,
        "SERVED_NAME": vllm_service.served_model_name(cfg),
        "PORT": str(cfg.vllm_port),
        "BASE_URL": verify.local_url(cfg),
        "SHUTDOWN_TIMEOUT": str(cfg.vllm_shutdown_timeout),
        "START_TIMEOUT": str(cfg.vllm_start_timeout),
    }
    (out / "smoke.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in shell.items()))
    return {"argv": argv, "env_keys": sorted(env), **shell}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, help="JSON object of data keys, replacing SMOKE_DATA")
    args = parser.parse_args()
    data = json.loads(args.data.read_text()) if args.data else dict(SMOKE_DATA)
    # A fresh key each render: the smoke run proves the server enforces it.
    data.setdefault("vllm_api_key", "smoke-" + secrets.token_hex(16))
    summary = render(data, args.out)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

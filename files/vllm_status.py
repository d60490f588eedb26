#!/usr/bin/env python3
"""What a host's vLLM unit runs and how it is doing, for `glmfleet status` and rollouts.

Stdlib only: glmfleet runs it on the host with the system Python, inline (`python3 -c`), so it
works on a host glmfleet never deployed to. Subcommands:

    unit PATH          the unit file's ExecStart, parsed (model, revision, port...), as JSON
    status PATH        the unit, the service's state, /version, /health, /metrics and GPUs, as JSON
    wait-idle PATH     wait until the vLLM of that unit runs no request (a drain), with --deadline

Only vLLM's unguarded routes are read (/health, /version, /metrics): no API key is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

HTTP_TIMEOUT_S = 3
WEIGHTS_DIR = re.compile(r"/models/(?P<owner>[^/]+?)--(?P<name>[^/]+)/(?P<revision>[0-9a-f]{40})/?$")
# Gauges whose sum is the number of requests vLLM holds (vLLM labels them per model and engine).
IN_FLIGHT_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")
GPU_QUERY = "index,name,memory.used,memory.total,utilization.gpu"


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in an argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def exec_start(unit_text: str) -> list[str]:
    """ExecStart as an argv, undoing the quoting glmfleet renders (quotes, `%%`, `$$`)."""
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            return [arg.replace("%%", "%").replace("$$", "$") for arg in shlex.split(line[len("ExecStart=") :])]
    return []


def local_url(listen: str, port: str) -> str:
    """Where the host itself reaches a server listening on `listen`: a wildcard means loopback."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen, listen)
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def read_unit(path: str) -> dict | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    argv = exec_start(raw.decode())
    # `<venv>/bin/vllm serve MODEL ...`, or `docker run ... --entrypoint vllm IMAGE serve MODEL ...`
    serve = argv.index("serve") if "serve" in argv[:-1] else None
    args = argv[serve + 1 :] if serve is not None else []
    model = args[0] if args else None
    # Weights the model_weights role fetched are served from <state>/models/<owner>--<name>/<commit>.
    weights = WEIGHTS_DIR.search(model or "")
    image = argv[serve - 1] if serve is not None and argv[0].endswith("/docker") else None
    venv = os.path.dirname(os.path.dirname(os.path.realpath(argv[0]))) if argv and not image else None
    return {
        "path": path,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "argv": argv,
        # What the program runs from: the venv its `current` link resolves to, or the image.
        "venv": os.path.basename(venv) if venv else None,
        "image": image,
        "model": f"{weights['owner']}/{weights['name']}" if weights else model,
        "revision": weights["revision"] if weights else option(args, "--revision"),
        "served_model_name": option(args, "--served-model-name") or model,
        "tensor_parallel_size": int(option(args, "--tensor-parallel-size") or 1),
        "base_url": local_url(option(args, "--host") or "0.0.0.0", option(args, "--port") or "8000"),
    }


def get(url: str) -> tuple[int | None, str]:
    """(HTTP status, body), or (None, why there was no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return None, str(getattr(error, "reason", error))


def in_flight(metrics_text: str) -> int:
    """Requests running plus waiting, summed over every sample of vLLM's two gauges
    (Prometheus text format: `name{labels} value [timestamp]`)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in IN_FLIGHT_METRICS:
            total += float(line.rsplit("}", 1)[-1].split()[0])
    return int(total)


def service_state(unit_name: str) -> dict:
    output = subprocess.run(
        ["systemctl", "show", unit_name, "--property=ActiveState,SubState,ActiveEnterTimestamp,NRestarts,MainPID"],
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def gpus() -> dict:
    """`nvidia-smi --query-gpu` per GPU, or why there is no answer."""
    if shutil.which("nvidia-smi") is None:
        return {"gpus": None, "gpu_error": "no nvidia-smi"}
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()
        return {"gpus": None, "gpu_error": lines[0] if lines else f"nvidia-smi exit {result.returncode}"}
    return {"gpus": parse_gpus(result.stdout), "gpu_error": None}


def parse_gpus(csv_text: str) -> list[dict]:
    found = []
    for line in csv_text.strip().splitlines():
        index, name, used, total, utilization = [field.strip() for field in line.split(",")]
        found.append(
            {
                "index": int(index),
                "name": name,
                "memory_used_mib": int(used),
                "memory_total_mib": int(total),
                "utilization_percent": None if utilization.startswith("[") else int(utilization),
            }
        )
    return found


def status(unit_path: str) -> dict:
    unit = read_unit(unit_path)
    report = {"unit": unit, "service": service_state(os.path.basename(unit_path)), **gpus()}
    if unit is None:
        return report
    code, body = get(f"{unit['base_url']}/health")
    report["health"] = code if code is not None else body
    code, body = get(f"{unit['base_url']}/version")
    report["version"] = json.loads(body).get("version") if code == 200 else None
    code, body = get(f"{unit['base_url']}/metrics")
    report["in_flight"] = in_flight(body) if code == 200 else None
    return report


def wait_idle(unit_path: str, deadline_s: float, interval_s: float = 0.5) -> str:
    """Wait until the unit's vLLM holds no request in two reads in a row (a request can sit
    between the engine and the HTTP reply for an instant); give up at the deadline."""
    unit = read_unit(unit_path)
    if unit is None:
        return "no unit: nothing to drain"
    started = time.monotonic()
    idle_reads = 0
    while True:
        code, body = get(f"{unit['base_url']}/metrics")
        if code != 200:
            return f"not answering ({body[:80] if code is None else code}): nothing to drain"
        count = in_flight(body)
        idle_reads = idle_reads + 1 if count == 0 else 0
        waited = time.monotonic() - started
        if idle_reads == 2:
            return f"drained: no request in flight after {waited:.1f} s"
        if waited > deadline_s:
            return f"{count} request(s) still in flight after {deadline_s:g} s: restarting anyway"
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm_status", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("unit", "status", "wait-idle"):
        command = commands.add_parser(name)
        command.add_argument("unit_path", metavar="PATH")
    commands.choices["wait-idle"].add_argument("--deadline", type=float, required=True, help="seconds to wait at most")
    args = parser.parse_args(argv)
    if args.command == "unit":
        print(json.dumps(read_unit(args.unit_path)))
    elif args.command == "status":
        print(json.dumps(status(args.unit_path)))
    else:
        print(wait_idle(args.unit_path, args.deadline))
    return 0


if __name__ == "__main__":
    sys.exit(main())

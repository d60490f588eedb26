#!/usr/bin/env python3
"""Run the rendered vLLM command the way its systemd unit would, time it, verify it, bench it.

Stdlib only; run as root on the GPU host after ``smoke.sh install`` and ``smoke.sh model``.
Reads what ``render.py`` wrote (``argv.json``, ``verify_argv.json``, ``smoke.env``) and the
installed EnvironmentFile, then:

1. cold start: the exact argv, as the unit's ``User=``, in its ``WorkingDirectory=``, with
   ``env -i`` semantics (the env file's variables, parsed by the project's own verify script,
   plus PATH as systemd sets it); time from exec to the first ``/health`` 200;
2. the project's verify step (``verify_argv`` + ``--deadline``) against it; a request with a
   wrong key; the verify step once for a name the server does not serve (it must say so);
3. stop as the unit does (SIGTERM, then SIGKILL to what is left after the stop timeout);
4. warm start: the same again, with ``VLLM_CACHE_ROOT`` (under the persistent state dir) kept
   and ``/tmp`` cleared of the user's compile files, as ``PrivateTmp=yes`` gives each start a
   fresh ``/tmp``;
5. a short ``vllm bench serve`` (random data, loopback only) against the warm server.

Results go to ``OUT/results.json``; each server's log to ``OUT/vllm-<label>.log``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# systemd's PATH for services (systemd.exec(5), "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Lines of vLLM's own log worth keeping in the results, by what they measure.
LOG_MARKS = {
    "compile": r"torch\.compile took ([\d.]+) s in total",
    "compile_cache_hit": r"(Directly load the compiled graph\(s\) for compile range .*? from the cache)",
    "graph_capture": r"Graph capturing finished in ([\d.]+) secs",
    "engine_init": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "weights": r"Model loading took ([\d.]+) Gi?B? memory and ([\d.]+) seconds",
    "kv_cache": r"GPU KV cache size: ([\d,]+) tokens",
    "attention_backend": r"Using (\S+) attention backend",
}


def read_kv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = shlex.split(value)[0] if value else ""
    return values


def env_file_vars(repo: Path, env_file: str) -> dict[str, str]:
    """The EnvironmentFile's variables, parsed by the project's own reader (files/verify_vllm.py)."""
    sys.path.insert(0, str(repo / "files"))
    from verify_vllm import read_env_file

    return read_env_file(env_file)


def libcuda_in_ld_cache() -> bool:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        listing = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    return "libcuda.so.1" in listing


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except Exception:
        return None


class Server:
    running: list["Server"] = []

    def __init__(self, label: str, argv: list[str], env: dict[str, str], user: str | None, cwd: str, out: Path):
        self.label = label
        self.log_path = out / f"vllm-{label}.log"
        self.log = open(self.log_path, "wb")
        kwargs = {}
        if user:
            entry = pwd.getpwnam(user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.started = time.monotonic()
        # Its own process group, so the stop can reach every engine process, as KillMode=mixed does.
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
            **kwargs,
        )
        Server.running.append(self)

    def wait_ready(self, base_url: str, deadline: float) -> float | None:
        give_up = self.started + deadline
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                return None
            if http_status(f"{base_url}/health") == 200:
                return time.monotonic() - self.started
            time.sleep(0.25)
        return None

    def stop(self, timeout: float) -> dict:
        began = time.monotonic()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
        try:  # KillMode=mixed: whatever is left of the unit's processes gets SIGKILL
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        if self in Server.running:
            Server.running.remove(self)
        return {
            "stop_s": round(time.monotonic() - began, 2),
            "exit": self.proc.returncode,
            "killed_after_timeout": killed,
        }

    def marks(self) -> dict:
        text = self.log_path.read_text(errors="replace")
        found = {}
        for name, pattern in LOG_MARKS.items():
            hits = re.findall(pattern, text)
            if hits:
                found[name] = hits[-1] if isinstance(hits[-1], str) else list(hits[-1])
        return found


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> dict:
    began = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, output = 124, f"timed out after {timeout} s: {error}"
    return {"cmd": cmd, "rc": code, "seconds": round(time.monotonic() - began, 2), "tail": output[-3000:]}


def gpu_memory_used() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError as error:
        return f"unknown ({error})"
    return done.stdout.strip()


def main() -> int:
    try:
        return smoke()
    finally:
        for server in list(Server.running):  # never leave a server holding the GPU
            server.stop(10)


def smoke() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rendered", type=Path, required=True)
    parser.add_argument("--repo", type=Path, required=True, help="the glmfleet checkout (for files/verify_vllm.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready-deadline", type=float, default=300)
    parser.add_argument("--as-root", action="store_true", help="run vLLM as root instead of the unit's User=")
    parser.add_argument("--bench-prompts", type=int, default=200)
    parser.add_argument("--skip-warm", action="store_true")
    args = parser.parse_args()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    smoke = read_kv(args.rendered / "smoke.env")
    argv = json.loads((args.rendered / "argv.json").read_text())
    verify_argv = json.loads((args.rendered / "verify_argv.json").read_text())
    file_env = env_file_vars(args.repo, smoke["ENV_FILE"])
    env = dict(file_env)
    env["PATH"] = SYSTEMD_PATH
    host_added = {}
    if not libcuda_in_ld_cache() and os.environ.get("LD_LIBRARY_PATH"):
        # Not in the unit: this image finds the driver's libcuda only through LD_LIBRARY_PATH.
        host_added["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    user = None if args.as_root else smoke["SERVICE_USER"]
    fallback = None
    if user:
        # The venv must import as the unit's user (the host's site-packages too); otherwise say
        # so and go on as root, so one call still measures the rest.
        probe = [f"{smoke['VENV_CURRENT_BIN']}/python", "-c", "import torch, vllm; print(torch.cuda.is_available())"]
        entry = pwd.getpwnam(user)
        done = subprocess.run(
            probe,
            env=env,
            cwd=smoke["STATE_DIR"],
            capture_output=True,
            text=True,
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
        )
        if done.returncode != 0 or "True" not in done.stdout:
            print(
                f"== as {user}, the venv does not import or sees no GPU; running as root:\n{done.stderr[-2000:]}",
                flush=True,
            )
            fallback = f"{user} could not import torch+vllm or see the GPU: {done.stderr[-500:]}"
            user = None
    results = {
        "argv": argv,
        "env_file_keys": sorted(file_env),
        "env_added_by_smoke": {"PATH": SYSTEMD_PATH, **host_added},
        "user": user or "root",
        "user_fallback": fallback,
        "cwd": smoke["STATE_DIR"],
        "runs": [],
    }

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    def start_and_check(label: str) -> Server | None:
        print(f"== {label} start: {shlex.join(argv)}", flush=True)
        server = Server(label, argv, env, user, smoke["STATE_DIR"], out)
        ready = server.wait_ready(smoke["BASE_URL"], args.ready_deadline)
        entry = {"label": label, "ready_s": round(ready, 2) if ready is not None else None}
        if ready is None:
            entry["exit"] = server.proc.poll()
            entry.update(server.stop(5))
            entry["log_tail"] = server.log_path.read_text(errors="replace")[-4000:]
            entry["marks"] = server.marks()
            results["runs"].append(entry)
            save()
            print(f"== {label}: NOT READY\n{entry['log_tail']}", flush=True)
            return None
        print(f"== {label}: /health 200 after {ready:.1f} s", flush=True)
        verify = run([*verify_argv, "--deadline", "120"], timeout=180)
        entry["verify"] = verify
        entry["ready_verified_s"] = round(time.monotonic() - server.started, 2)
        entry["gpu_memory_used"] = gpu_memory_used()
        print(f"== {label}: verify rc={verify['rc']}: {verify['tail'].strip()}", flush=True)
        results["runs"].append(entry)
        save()
        return server

    def stop(server: Server, entry_label: str):
        stopped = server.stop(float(smoke["SHUTDOWN_TIMEOUT"]) + 30)
        marks = server.marks()
        for entry in results["runs"]:
            if entry["label"] == entry_label:
                entry.update(stopped)
                entry["marks"] = marks
                entry["gpu_memory_after_stop"] = gpu_memory_used()
        save()
        print(f"== {entry_label}: stopped {stopped}; marks {marks}", flush=True)

    cold = start_and_check("cold")
    if cold is None:
        return 1
    # A wrong key must be refused: the key reaches vLLM from the env file, not from argv.
    try:
        request = urllib.request.Request(f"{smoke['BASE_URL']}/v1/models", headers={"Authorization": "Bearer wrong"})
        urllib.request.urlopen(request, timeout=10)
        results["wrong_key_status"] = 200
    except urllib.error.HTTPError as error:
        results["wrong_key_status"] = error.code
    # A name vLLM does not serve: the verify step's completion gets a 404, which /v1/models explains.
    unserved = list(verify_argv)
    unserved[unserved.index("--served-model-name") + 1] = "not-served"
    results["verify_unserved_name"] = named = run([*unserved, "--deadline", "0"], timeout=60)
    save()
    print(f"== verify of a name not served: rc={named['rc']}: {named['tail'].strip()}", flush=True)
    ok = results["runs"][-1]["verify"]["rc"] == 0 and named["rc"] == 1 and "/v1/models lists" in named["tail"]
    if args.skip_warm:
        stop(cold, "cold")
        return 0 if ok else 1
    stop(cold, "cold")

    # PrivateTmp=yes: every start of the unit gets an empty /tmp; only VLLM_CACHE_ROOT persists.
    for path in glob.glob(f"/tmp/torchinductor_{user or 'root'}") + glob.glob("/tmp/torchinductor_*"):
        shutil.rmtree(path, ignore_errors=True)
    cache_root = file_env.get("VLLM_CACHE_ROOT", "")
    results["cache_root_files_before_warm"] = (
        sum(len(files) for _, _, files in os.walk(cache_root)) if cache_root else None
    )

    warm = start_and_check("warm")
    if warm is None:
        return 1
    ok = ok and results["runs"][-1]["verify"]["rc"] == 0

    bench_env = {
        "PATH": SYSTEMD_PATH,
        "HOME": "/root",
        "HF_HUB_OFFLINE": "1",
        "OPENAI_API_KEY": file_env.get("VLLM_API_KEY", ""),
        **host_added,
    }
    bench = run(
        [
            f"{smoke['VENV_CURRENT_BIN']}/vllm",
            "bench",
            "serve",
            "--backend",
            "vllm",
            "--base-url",
            smoke["BASE_URL"],
            "--endpoint",
            "/v1/completions",
            "--model",
            smoke["MODEL_DIR"],
            "--served-model-name",
            smoke["SERVED_NAME"],
            "--tokenizer",
            smoke["MODEL_DIR"],
            "--dataset-name",
            "random",
            "--random-input-len",
            "256",
            "--random-output-len",
            "128",
            "--num-prompts",
            str(args.bench_prompts),
            "--max-concurrency",
            "32",
            "--ignore-eos",
            "--seed",
            "0",
            "--save-result",
            "--result-dir",
            str(out),
            "--result-filename",
            "bench.json",
        ],
        env=bench_env,
        timeout=240,
    )
    results["bench"] = bench
    save()
    print(f"== bench rc={bench['rc']}\n{bench['tail'][-2500:]}", flush=True)
    stop(warm, "warm")
    bench_file = out / "bench.json"
    if bench_file.is_file():
        data = json.loads(bench_file.read_text())
        results["bench_summary"] = {
            key: data.get(key)
            for key in (
                "num_prompts",
                "completed",
                "duration",
                "request_throughput",
                "output_throughput",
                "total_token_throughput",
                "mean_ttft_ms",
                "median_ttft_ms",
                "mean_tpot_ms",
                "median_tpot_ms",
                "max_concurrency",
            )
        }
    save()
    return 0 if ok and bench["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

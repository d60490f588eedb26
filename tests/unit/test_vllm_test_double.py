"""Tests of the vLLM test double and of the loopback package index it ships through.

Real processes on loopback, no mocks: the double is installed into a fresh
venv from pkgindex's pypiserver, which also proves that index end to end,
and every test runs the installed `vllm` console script.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import pkgindex
from tests.support.fleettools import UV_VERSION, wait_for

DOUBLE_VERSION = pkgindex.TEST_DOUBLE_VERSION
DOUBLE_WHEEL = f"vllm_test_double-{DOUBLE_VERSION}-py3-none-any.whl"
# Any pinned uv proves the index carries it; glmfleet's fixtures pass the product's pin.
MODEL = "zai-org/GLM-4.5-Air"
SERVED = ["glm-4.5-air", "glm"]
# Loopback must never go through an HTTP proxy from the environment.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    pkgindex.fill_index_dir(directory)
    return directory


@pytest.fixture(scope="session")
def package_index(index_dir):
    with pkgindex.PackageIndex(index_dir) as index:
        yield index


def _uv_env() -> dict:
    # Only the index under test may be consulted, whatever UV_* settings the runner has.
    return {key: value for key, value in os.environ.items() if not key.startswith("UV_")}


def _venv_from_index(venv: Path, index_url: str, *requirements: str) -> Path:
    """A fresh venv with requirements installed from index_url alone; returns its bin/."""
    subprocess.run(
        [pkgindex.uv_command(), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=_uv_env()
    )
    install = subprocess.run(
        [pkgindex.uv_command(), "pip", "install", "--python", str(venv / "bin" / "python"), "--no-config", "--no-cache",
         "--index-url", index_url, *requirements],
        capture_output=True, text=True, env=_uv_env(),
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return venv / "bin"


@pytest.fixture(scope="session")
def vllm_bin(package_index, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("double") / "venv"
    return _venv_from_index(venv, package_index.url, f"vllm-test-double=={DOUBLE_VERSION}") / "vllm"


@dataclass
class Response:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class Double:
    """One `vllm serve` process of the installed double, on a free loopback port."""

    def __init__(self, vllm_bin: Path, log_dir: Path, args: list[str], env: dict[str, str]):
        self.port = _free_port()
        self.log_path = log_dir / f"vllm-{self.port}.log"
        base_env = {
            k: v for k, v in os.environ.items() if k != "VLLM_API_KEY" and not k.startswith("VLLM_TEST_DOUBLE_")
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(vllm_bin), "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**base_env, **env},
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, headers: dict | None = None) -> Response:
        return http_request("GET", self.url(path), headers=headers)

    def post(self, path: str, payload=None, headers: dict | None = None) -> Response:
        return http_request("POST", self.url(path), payload, headers)

    def accepts_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except ConnectionError:  # refused, or reset by a listener that is closing
            return False

    def wait_until_bound(self) -> "Double":
        wait_for(lambda: self.process.poll() is not None or self.accepts_connections(), what="the port to be bound")
        assert self.process.poll() is None, f"vllm exited with {self.process.returncode}:\n{self.log()}"
        return self

    def wait_until_healthy(self) -> "Double":
        self.wait_until_bound()
        wait_for(lambda: self.get("/health").status == 200, what="/health to answer 200")
        return self

    def metric(self, name: str) -> float:
        """The value of metric name on /metrics, summed over its series (a counter of requests
        has one per finish reason)."""
        text = self.get("/metrics").body.decode()
        values = re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert values, f"no {name} on /metrics"
        return sum(map(float, values))


@pytest.fixture
def start_double(vllm_bin, tmp_path):
    """Start the installed double: start_double(*serve_args, **env); ends leftovers at teardown."""
    started: list[Double] = []

    def start(*args: str, **env: str) -> Double:
        double = Double(vllm_bin, tmp_path, list(args), env)
        started.append(double)
        return double

    yield start
    for double in started:
        if double.process.poll() is None:
            double.process.kill()
            double.process.wait()


def http_request(method: str, url: str, payload=None, headers: dict | None = None, timeout: float = 10) -> Response:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _direct.open(request, timeout=timeout) as response:
            return Response(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chat(messages, **fields) -> dict:
    return {"model": SERVED[0], "messages": messages, **fields}


def in_background(function):
    """Run function in a thread; the returned dict gets its "result" or "error"."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = function()
        except Exception as error:  # the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


# --- the package index -------------------------------------------------------


def test_double_is_installed_from_the_loopback_index(vllm_bin, package_index):
    assert vllm_bin.exists()
    assert f"GET /packages/{DOUBLE_WHEEL}" in package_index.log_path.read_text()


def test_index_does_not_fall_back_to_pypi(package_index):
    # With fallback, pypiserver would redirect a package it lacks to PyPI;
    # http.client does not follow redirects, so this never leaves loopback.
    connection = http.client.HTTPConnection(package_index.host, package_index.port, timeout=10)
    try:
        connection.request("GET", "/simple/six/")
        assert connection.getresponse().status == 404
    finally:
        connection.close()


def test_index_carries_a_pinned_uv_wheel(package_index, index_dir, tmp_path):
    # pypiserver lists its directory on each request, so a wheel added now is served.
    (wheel,) = pkgindex.download_wheels([f"uv=={UV_VERSION}"], index_dir)
    assert wheel.name.startswith(f"uv-{UV_VERSION}-")
    bin_dir = _venv_from_index(tmp_path / "venv", package_index.url, f"uv=={UV_VERSION}")
    version = subprocess.run([bin_dir / "uv", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.split()[:2] == ["uv", UV_VERSION]
    assert f"GET /packages/{wheel.name}" in package_index.log_path.read_text()


def _pypiserver_pids(port: int) -> list[int]:
    """Pids of live pypiserver processes started by pkgindex for port."""
    pids = []
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline_file.read_bytes().split(b"\0")
            state = (cmdline_file.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            b"pypiserver" in b" ".join(args)
            and (b"--port", str(port).encode()) in zip(args, args[1:], strict=False)
            and state != "Z"
        ):
            pids.append(int(cmdline_file.parent.name))
    return pids


def test_index_stop_leaves_no_process(tmp_path):
    index = pkgindex.PackageIndex(tmp_path)
    index.start()
    port = index.port
    try:
        assert _pypiserver_pids(port)
    finally:
        index.stop()
    assert not _pypiserver_pids(port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_index_dies_with_a_killed_parent(tmp_path):
    starter = subprocess.Popen(
        [sys.executable, "-c", "import pkgindex, time\n"
         f"index = pkgindex.PackageIndex({str(tmp_path)!r}); index.start()\n"
         "print(index.port, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(pkgindex.__file__).parent)},
    )  # fmt: skip
    port = int(starter.stdout.readline())
    assert _pypiserver_pids(port)
    starter.kill()
    starter.wait()
    starter.stdout.close()
    try:
        wait_for(lambda: not _pypiserver_pids(port), what="pypiserver to die with its parent")
    finally:  # an orphan left by a failure here must not outlive the test run
        for pid in _pypiserver_pids(port):
            os.kill(pid, signal.SIGKILL)


# --- the console script ------------------------------------------------------


def test_version_flag_prints_the_distribution_version(vllm_bin):
    result = subprocess.run([vllm_bin, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == DOUBLE_VERSION


def test_help_says_it_is_a_test_double(vllm_bin):
    top = subprocess.run([vllm_bin, "--help"], capture_output=True, text=True, check=True).stdout
    serve = subprocess.run([vllm_bin, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "TEST DOUBLE for vLLM -- it serves no model" in top
    assert "TEST DOUBLE" in serve and "serves no model" in serve
    assert "VLLM_TEST_DOUBLE_FAIL" in serve


def test_unit_flags_are_parsed_and_unknown_flags_recorded(start_double):
    double = start_double(
        MODEL, "--served-model-name", *SERVED, "--tensor-parallel-size", "2", "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.85", "--trust-remote-code", "--tool-call-parser", "glm45",
        "--reasoning-parser", "glm45", "--enable-auto-tool-choice", "--shutdown-timeout", "5",
        "--enable-prefix-caching", "--max-num-seqs", "8",
    ).wait_until_healthy()  # fmt: skip
    log = double.log()
    assert "'tensor_parallel_size': 2" in log
    assert "'gpu_memory_utilization': 0.85" in log
    assert "'tool_call_parser': 'glm45'" in log and "'enable_auto_tool_choice': True" in log
    assert "unrecognized arguments (recorded, not acted on): --enable-prefix-caching --max-num-seqs 8" in log
    assert f"Starting vLLM API server (test double) on http://127.0.0.1:{double.port}" in log
    models = double.get("/v1/models").json()["data"]
    assert [m["max_model_len"] for m in models] == [4096, 4096]


# --- the HTTP API ------------------------------------------------------------


def test_health_ping_version_and_models(start_double):
    double = start_double(MODEL, "--served-model-name", *SERVED, "--max-model-len", "4096").wait_until_healthy()
    assert double.get("/health") == Response(200, b"")
    assert double.get("/ping") == Response(200, b"")
    assert double.post("/ping") == Response(200, b"")
    assert double.get("/version").json() == {"version": DOUBLE_VERSION}
    models = double.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["root"], m["max_model_len"]) for m in models["data"]] == [
        (name, "model", "vllm-test-double", MODEL, 4096) for name in SERVED
    ]
    assert double.get("/v1/nothing-here").status == 404
    assert double.get("/v1/chat/completions").status == 405


def test_served_name_defaults_to_the_model_given_by_flag(start_double):
    double = start_double("--model", MODEL).wait_until_healthy()
    assert [m["id"] for m in double.get("/v1/models").json()["data"]] == [MODEL]
    assert (
        double.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).json()["model"] == MODEL
    )


def test_positional_model_beats_the_model_flag_with_a_warning(start_double):
    double = start_double("--model", MODEL, "--max-num-seqs", "8").wait_until_healthy()
    assert [m["id"] for m in double.get("/v1/models").json()["data"]] == ["8"]
    assert f"MODEL '8' overrides --model '{MODEL}'" in double.log()


def test_chat_completion_echoes_the_last_user_message(start_double):
    double = start_double(MODEL, "--served-model-name", *SERVED).wait_until_healthy()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "how are"}, {"type": "text", "text": "you today"}]},
    ]
    response = double.post("/v1/chat/completions", chat(messages, model=SERVED[1]))
    assert response.status == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == SERVED[1]
    (choice,) = completion["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "how are you today"
    assert choice["finish_reason"] == "stop"
    # Word counts: 3 system + 2 + 2 + 4 prompt words, 4 reply words.
    assert completion["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def test_chat_completion_respects_max_tokens(start_double):
    double = start_double(MODEL).wait_until_healthy()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 2}
    completion = double.post("/v1/chat/completions", body).json()
    assert completion["choices"][0]["message"]["content"] == "one two"
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 2


def test_chat_completion_errors_are_vllm_shaped(start_double):
    double = start_double(MODEL, "--served-model-name", *SERVED).wait_until_healthy()
    unknown = double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], model=MODEL))
    assert unknown.status == 404
    assert unknown.json()["error"]["code"] == 404 and unknown.json()["error"]["type"] == "NotFoundError"
    streaming = double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], stream=True))
    assert streaming.status == 400 and streaming.json()["error"]["param"] == "stream"
    assert double.post("/v1/chat/completions", chat([])).status == 400
    assert double.post("/v1/chat/completions", chat([{"role": "user", "content": "x"}], max_tokens=0)).status == 400


def test_completions_echo_each_prompt(start_double):
    double = start_double(MODEL, "--served-model-name", *SERVED).wait_until_healthy()
    single = double.post("/v1/completions", {"model": SERVED[0], "prompt": "say this back"}).json()
    assert single["object"] == "text_completion"
    assert [c["text"] for c in single["choices"]] == ["say this back"]
    assert single["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    several = double.post("/v1/completions", {"model": SERVED[0], "prompt": ["a b c", "d"], "max_tokens": 1}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in several["choices"]] == [
        (0, "a", "length"),
        (1, "d", "stop"),
    ]
    assert double.post("/v1/completions", {"model": "other", "prompt": "x"}).status == 404


# --- the API key ---------------------------------------------------------------


def test_api_key_flag_beats_the_environment(start_double):
    double = start_double(MODEL, "--api-key", "flag-key", VLLM_API_KEY="env-key").wait_until_healthy()
    assert double.get("/v1/models") == Response(401, b'{"error": "Unauthorized"}')
    assert double.get("/v1/models", {"Authorization": "Bearer env-key"}).status == 401
    assert double.get("/v1/models", {"Authorization": "flag-key"}).status == 401
    assert double.get("/v1/models", {"Authorization": "Bearer flag-key"}).status == 200
    hello = chat([{"role": "user", "content": "hi"}], model=MODEL)
    assert double.post("/v1/chat/completions", hello).status == 401
    assert double.post("/v1/chat/completions", hello, {"Authorization": "Bearer flag-key"}).status == 200
    # Only /v1 is guarded, as in vLLM.
    assert [double.get(path).status for path in ("/health", "/metrics", "/version")] == [200, 200, 200]
    log = double.log()
    assert "flag-key" not in log and "env-key" not in log


def test_api_key_from_the_environment(start_double):
    double = start_double(MODEL, VLLM_API_KEY="env-key").wait_until_healthy()
    assert double.get("/v1/models").status == 401
    assert double.get("/v1/models", {"Authorization": "Bearer env-key"}).status == 200


# --- test knobs ----------------------------------------------------------------


def test_startup_delay_binds_the_port_but_answers_503_until_loaded(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_STARTUP_DELAY="1.5").wait_until_bound()
    assert double.get("/health") == Response(503, b"")
    assert double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], model=MODEL)).status == 503
    assert double.get("/v1/models").status == 503
    wait_for(lambda: double.get("/health").status == 200, what="/health to turn 200 after the delay")
    assert double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], model=MODEL)).status == 200


def test_fail_exit_crashes_after_the_startup_delay(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_STARTUP_DELAY="1", VLLM_TEST_DOUBLE_FAIL="exit").wait_until_bound()
    assert double.get("/health").status == 503
    assert double.process.wait(timeout=10) == 1
    assert "Engine core initialization failed" in double.log()


def test_fail_unhealthy_never_turns_healthy(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_FAIL="unhealthy").wait_until_bound()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        assert double.get("/health").status == 503
        time.sleep(0.1)
    assert double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], model=MODEL)).status == 503
    assert double.process.poll() is None


def test_fail_error_is_healthy_but_completions_fail(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_FAIL="error").wait_until_healthy()
    assert double.get("/v1/models").status == 200
    failed = double.post("/v1/chat/completions", chat([{"role": "user", "content": "hi"}], model=MODEL))
    assert failed.status == 500 and failed.json()["error"]["type"] == "InternalServerError"
    assert double.post("/v1/completions", {"model": MODEL, "prompt": "hi"}).status == 500
    assert double.metric("vllm:request_success_total") == 0


def test_unknown_fail_mode_is_refused(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_FAIL="explode")
    assert double.process.wait(timeout=10) == 2
    assert "VLLM_TEST_DOUBLE_FAIL='explode'" in double.log()


def test_metrics_count_in_flight_requests(start_double):
    double = start_double(MODEL, "--served-model-name", *SERVED, VLLM_TEST_DOUBLE_LATENCY="1.5").wait_until_healthy()
    # vLLM labels its metrics with the first served model name and the engine's index.
    assert (
        f'vllm:num_requests_running{{engine="0",model_name="{SERVED[0]}"}} 0.0' in double.get("/metrics").body.decode()
    )
    assert double.metric("vllm:num_requests_waiting") == 0
    hello = chat([{"role": "user", "content": "hi"}])
    requests = [in_background(lambda: double.post("/v1/chat/completions", hello)) for _ in range(2)]
    wait_for(lambda: double.metric("vllm:num_requests_running") == 2, what="two requests in flight")
    for request in requests:
        request["thread"].join(timeout=10)
        assert request["result"].status == 200
    assert double.metric("vllm:num_requests_running") == 0
    assert double.metric("vllm:request_success_total") == 2
    assert metric_sample(double, "vllm:request_success_total", finished_reason="stop") == 2
    assert metric_sample(double, "vllm:e2e_request_latency_seconds_count") == 2
    assert metric_sample(double, "vllm:e2e_request_latency_seconds_bucket", le="1.0") == 0
    assert metric_sample(double, "vllm:e2e_request_latency_seconds_bucket", le="2.0") == 2
    # "hi": one prompt token and one generated, per request.
    assert double.metric("vllm:prompt_tokens_total") == double.metric("vllm:generation_tokens_total") == 2


def metric_sample(double: Double, name: str, **labels: str) -> float:
    """One sample of /metrics, read by prometheus_client's own parser of the text format."""
    text = double.get("/metrics").body.decode()
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    return value


def test_metrics_are_vllms_names_types_and_labels(start_double):
    """What Prometheus and the alert rules read: vLLM's metric families and types (counters with
    their _total), each sample labelled with the served model name and the engine index."""
    double = start_double(MODEL, "--served-model-name", *SERVED).wait_until_healthy()
    families = {family.name: family for family in text_string_to_metric_families(double.get("/metrics").body.decode())}
    assert {name: family.type for name, family in families.items()} == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:e2e_request_latency_seconds": "histogram",
    }
    for family in families.values():
        for sample in family.samples:
            assert {"model_name": SERVED[0], "engine": "0"}.items() <= sample.labels.items()
    reasons = {sample.labels["finished_reason"] for sample in families["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort"}


# --- SIGTERM -------------------------------------------------------------------


def _sigterm_during_a_request(double: Double) -> tuple[dict, float]:
    """Start a slow chat request, SIGTERM the double once it is in flight; return (request, sent at)."""
    request = in_background(
        lambda: double.post("/v1/chat/completions", chat([{"role": "user", "content": "still here"}], model=MODEL))
    )
    wait_for(lambda: double.metric("vllm:num_requests_running") == 1, what="the request to be in flight")
    double.process.send_signal(signal.SIGTERM)
    return request, time.monotonic()


def test_sigterm_with_shutdown_timeout_drains_in_flight_requests(start_double):
    double = start_double(MODEL, "--shutdown-timeout", "10", VLLM_TEST_DOUBLE_LATENCY="1.5").wait_until_healthy()
    request, sent_at = _sigterm_during_a_request(double)
    wait_for(lambda: not double.accepts_connections(), what="new connections to be refused", timeout_s=1)
    assert double.process.poll() is None, "exited before the in-flight request finished"
    request["thread"].join(timeout=10)
    assert request["result"].status == 200
    assert request["result"].json()["choices"][0]["message"]["content"] == "still here"
    assert double.process.wait(timeout=10) == 0
    assert time.monotonic() - sent_at < 5, "waited for the whole shutdown timeout instead of the request"


def test_sigterm_drain_gives_up_at_the_shutdown_timeout(start_double):
    double = start_double(MODEL, "--shutdown-timeout", "0.5", VLLM_TEST_DOUBLE_LATENCY="5").wait_until_healthy()
    _, sent_at = _sigterm_during_a_request(double)
    assert double.process.wait(timeout=5) == 0
    assert 0.4 < time.monotonic() - sent_at < 3
    assert "still in flight after 0.5s" in double.log()


def test_sigterm_without_shutdown_timeout_exits_promptly(start_double):
    double = start_double(MODEL, VLLM_TEST_DOUBLE_LATENCY="5").wait_until_healthy()
    request, sent_at = _sigterm_during_a_request(double)
    assert double.process.wait(timeout=5) == 0
    assert time.monotonic() - sent_at < 1.5
    request["thread"].join(timeout=10)
    assert "result" not in request, "the in-flight request was served, not dropped"

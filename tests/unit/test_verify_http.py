"""files/verify_vllm.py against the HTTP server vLLM's API server runs on: uvicorn, with both of
its HTTP parsers (vLLM installs uvicorn[standard], so httptools; h11 where that is missing).
The ASGI app here answers the three endpoints the check may ask, as FastAPI answers them in
vLLM (with a length), or streamed without one (httptools then sends chunks, h11 closes at the end);
the fleet tests run the same script against the vLLM test double."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from glmfleet import FILES
from glmfleet.facts.output import host_script

SCRIPT = FILES / "verify_vllm.py"
API_KEY = "sk-verify-http-7f3a"
SERVED = "glm-4-9b"
# Enough other models that /v1/models is several reads of the socket long.
OTHER_MODELS = [{"id": f"padding-model-{index:05d}", "object": "model"} for index in range(3000)]


def app_like_vllm(streamed: bool, health: int = 200, completion_error: int | None = None) -> FastAPI:
    """vLLM's answers, as its API server gives them; health: /health's status (503: the engine
    is dead); completion_error: the status every completion gets instead of an answer."""
    app = FastAPI()

    def authorized(authorization: str | None) -> None:
        if authorization != f"Bearer {API_KEY}":
            raise HTTPException(status_code=401, detail="Unauthorized")

    def answer(payload: dict):
        if streamed:
            text = json.dumps(payload)
            return StreamingResponse(
                (text[i : i + 4096] for i in range(0, len(text), 4096)), media_type="application/json"
            )
        return payload

    @app.get("/health")
    def health_check():
        if health != 200:
            raise HTTPException(status_code=health)

    @app.get("/v1/models")
    def models(authorization: str | None = Header(default=None)):
        authorized(authorization)
        return answer({"object": "list", "data": [*OTHER_MODELS, {"id": SERVED, "object": "model"}]})

    app.state.completions_asked = 0

    @app.post("/v1/chat/completions")
    async def chat(request: Request, authorization: str | None = Header(default=None)):
        app.state.completions_asked += 1
        authorized(authorization)
        body = await request.json()
        assert body["messages"][0]["role"] == "user"
        if body["model"] != SERVED:
            raise HTTPException(status_code=404, detail=f"The model `{body['model']}` does not exist.")
        if completion_error:
            raise HTTPException(status_code=completion_error, detail="EngineCore encountered an issue.")
        return answer(
            {"choices": [{"message": {"role": "assistant", "content": "Hello"}}], "usage": {"completion_tokens": 1}}
        )

    return app


@pytest.fixture(
    params=[("httptools", False), ("httptools", True), ("h11", False), ("h11", True)],
    ids=["httptools", "httptools-streamed", "h11", "h11-streamed"],
)
def server_url(request):
    parser, streamed = request.param
    with serving(app_like_vllm(streamed), parser) as url:
        yield url


@contextmanager
def serving(app: FastAPI, parser: str = "httptools", address: str = "127.0.0.1"):
    """uvicorn serving app on a free port of address; yields the base URL."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    server = uvicorn.Server(uvicorn.Config(app, http=parser, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://{f'[{address}]' if ':' in address else address}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def verify(base_url: str, env_file: Path, served: str = SERVED) -> subprocess.CompletedProcess:
    return run_script(
        "--base-url", base_url, "--served-model-name", served, "--env-file", str(env_file), "--deadline", "0"
    )


def env_file(directory: Path, key: str) -> Path:
    path = directory / "vllm.env"
    path.write_text(f'VLLM_API_KEY="{key}"\n')
    return path


def test_a_serving_vllm_passes(server_url, tmp_path):
    result = verify(server_url, env_file(tmp_path, API_KEY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"serving: {SERVED!r} answered a chat completion: 'Hello' (1 tokens" in result.stdout


def test_a_refused_key_fails_with_the_servers_answer(server_url, tmp_path):
    result = verify(server_url, env_file(tmp_path, "sk-wrong"))
    assert result.returncode == 1
    assert f"not serving after 0 s: {server_url}/v1/models answered 401: " in result.stdout
    assert "Unauthorized" in result.stdout


def test_a_server_that_answers_without_serving_is_asked_again_only_after_five_seconds(tmp_path):
    """Tries come every --interval while nothing answers, but a server that answers with an
    error is not loading: asking it every second would only fill its log."""
    app = app_like_vllm(streamed=False)
    with serving(app) as url:
        result = run_script(
            "--base-url",
            url,
            "--served-model-name",
            SERVED,
            "--env-file",
            str(env_file(tmp_path, "sk-wrong")),
            "--deadline",
            "3",
            "--interval",
            "1",
        )
    assert result.returncode == 1 and "/v1/models answered 401" in result.stdout
    assert app.state.completions_asked == 1


def test_a_name_the_server_does_not_serve_is_named_with_those_it_does(server_url, tmp_path):
    result = verify(server_url, env_file(tmp_path, API_KEY), served="glm-4-32b")
    assert result.returncode == 1
    assert result.stdout.startswith("not serving after 0 s: /v1/models lists ['padding-model-00000', ")
    assert result.stdout.endswith(f"{SERVED!r}], not 'glm-4-32b'\n")


def test_a_dead_engine_is_named_by_its_health(tmp_path):
    with serving(app_like_vllm(streamed=False, health=503, completion_error=500)) as url:
        result = verify(url, env_file(tmp_path, API_KEY))
    assert result.returncode == 1
    assert result.stdout.startswith(f"not serving after 0 s: {url}/health answered 503: ")


def test_an_error_answer_the_other_checks_find_nothing_behind_is_reported_as_given(tmp_path):
    with serving(app_like_vllm(streamed=False, completion_error=500)) as url:
        result = verify(url, env_file(tmp_path, API_KEY))
    assert result.returncode == 1
    assert result.stdout.startswith(f"not serving after 0 s: {url}/v1/chat/completions answered 500: ")
    assert "EngineCore encountered an issue." in result.stdout


def test_nothing_listening_is_no_answer(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = verify(f"http://127.0.0.1:{port}", env_file(tmp_path, API_KEY))
    assert result.returncode == 1
    assert result.stdout.startswith("not serving after 0 s: no answer: ")


@contextmanager
def one_connection(handle):
    """A bare TCP server on loopback: ``handle(connection, listener)`` gets the first connection
    it accepts, in a thread. Yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    threading.Thread(target=lambda: handle(listener.accept()[0], listener), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_server_that_closes_without_answering_is_no_answer(tmp_path):
    def close_the_connection(connection, _listener):
        connection.recv(1 << 16)  # the request read: closing now sends a FIN, not a reset
        connection.close()

    with one_connection(close_the_connection) as url:
        result = verify(url, env_file(tmp_path, API_KEY))
    assert result.returncode == 1
    assert result.stdout == "not serving after 0 s: no answer: the server closed the connection without an answer\n"


def test_an_error_answer_is_reported_as_given_where_nothing_answers_after_it(tmp_path):
    """A server that answers the completion with an error, then stops: /health and /v1/models
    get no answer, which says less than the completion's answer did."""

    def answer_once_then_stop(connection, listener):
        connection.recv(1 << 16)
        listener.close()  # before answering: the next connection is refused, never left waiting
        connection.sendall(b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 15\r\n\r\nEngine is dead.")
        connection.close()

    with one_connection(answer_once_then_stop) as url:
        result = verify(url, env_file(tmp_path, API_KEY))
    assert result.returncode == 1
    assert result.stdout == f"not serving after 0 s: {url}/v1/chat/completions answered 500: Engine is dead.\n"


def test_an_ipv6_base_url_with_a_trailing_slash_is_asked(tmp_path):
    with serving(app_like_vllm(streamed=False), address="::1") as url:
        result = verify(url + "/", env_file(tmp_path, API_KEY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"serving: {SERVED!r} answered a chat completion: 'Hello'")


@pytest.mark.parametrize(
    "args, problem",
    [
        ([], "missing --base-url and --served-model-name"),
        (
            ["--base-url", "https://127.0.0.1:8000", "--served-model-name", SERVED],
            "--base-url https://127.0.0.1:8000: expected http://HOST:PORT, plain http to the host's own vLLM",
        ),
        (
            ["--base-url", "http://127.0.0.1", "--served-model-name", SERVED],
            "--base-url http://127.0.0.1: expected http://HOST:PORT, plain http to the host's own vLLM",
        ),
        (
            ["--base-url", "http://127.0.0.1:99999", "--served-model-name", SERVED],
            "--base-url http://127.0.0.1:99999: expected http://HOST:PORT, plain http to the host's own vLLM",
        ),
        (
            ["--base-url", "http://127.0.0.1:8000", "--served-model-name", SERVED, "--deadline", "soon"],
            "--deadline soon: expected a number of seconds",
        ),
        (
            ["--base-url", "http://127.0.0.1:8000", "--served-model-name", SERVED, "--port", "8000"],
            "option --port not recognized",
        ),
        (
            ["--base-url", "http://127.0.0.1:8000", "--served-model-name"],
            "option --served-model-name requires argument",
        ),
        (["--base-url", "http://127.0.0.1:8000", "--served-model-name", SERVED, "now"], "unexpected argument 'now'"),
    ],
)
def test_a_bad_command_line_says_what_is_wrong_and_asks_nothing(args, problem):
    result = run_script(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"verify-vllm: {problem} (verify-vllm --help lists the options)\n"


def test_an_error_without_a_message_is_named_by_its_kind():
    """A read through the controller's SSH channel times out with an empty socket.timeout."""
    describe = host_script("verify_vllm").describe
    assert describe(TimeoutError()) == "no answer: TimeoutError"
    assert describe(ConnectionRefusedError(111, "Connection refused")) == "no answer: [Errno 111] Connection refused"
    assert describe(RuntimeError("/v1/models lists []")) == "/v1/models lists []"


def test_a_link_local_base_url_with_its_zone_is_asked():
    """vllm_host may be a link-local address with its zone (fe80::1%eth0), as config accepts."""
    result = run_script("--base-url=http://[fe80::1%lo]:9", "--served-model-name", SERVED, "--deadline", "0")
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.startswith("not serving after 0 s: no answer: ")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_documents_every_option(flag):
    result = run_script(flag)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Prove that a vLLM server serves")
    verify_vllm = host_script("verify_vllm")
    for name in verify_vllm.OPTIONS:
        assert f"\n  --{name} " in result.stdout, name


def test_every_request_goes_through_the_connect_given(server_url):
    """The controller passes a connect of its own (through the host's SSH connection): the
    script opens every connection with it, one for a serving host, three for one that
    answers with an error (the completion, then /health and /v1/models to say why)."""
    verify_vllm = host_script("verify_vllm")
    opened = []

    def connect(address, timeout):
        opened.append(address)
        return socket.create_connection(address, timeout)

    summary = verify_vllm.check_once(server_url, SERVED, API_KEY, connect=connect)
    assert summary.startswith(f"serving: {SERVED!r} answered a chat completion")
    vllm_address = ("127.0.0.1", int(server_url.rsplit(":", 1)[1]))
    assert opened == [vllm_address]
    with pytest.raises(verify_vllm.ErrorAnswer, match="/v1/models answered 401"):
        verify_vllm.check_once(server_url, SERVED, "sk-wrong", connect=connect)
    assert opened == [vllm_address] * 4


def test_a_connection_sshd_does_not_open_while_explaining_leaves_the_completions_answer():
    """The controller's connect raises NotForwarded where the host's sshd opens no connection
    (vLLM went away after answering): like a refused connection, it leaves the completion's
    own answer to tell what is wrong."""
    from glmfleet.connection import NotForwarded

    verify_vllm = host_script("verify_vllm")
    opened = []

    def connect(address, timeout):
        opened.append(address)
        if len(opened) > 1:
            raise NotForwarded(
                f"fleet-01's sshd opened no connection to {address[0]} port {address[1]}: Connect failed"
            )
        return socket.create_connection(address, timeout)

    with serving(app_like_vllm(streamed=False, completion_error=500)) as url:
        with pytest.raises(verify_vllm.ErrorAnswer, match="/v1/chat/completions answered 500"):
            verify_vllm.check_once(url, SERVED, API_KEY, connect=connect)
    assert len(opened) == 2  # the completion, then /health: sshd opened no connection for it


def test_the_controller_makes_the_request_itself_on_the_host_it_runs_on(tmp_path):
    """pyinfra's @local: the controller is the host, so it connects to vLLM directly. The
    answer says what the verify script would, and nothing is asked of the host."""
    from pyinfra.context import ctx_host, ctx_state

    from glmfleet.config import resolve
    from roles.verify import serving_now
    from tests.support.planning import connected

    def answer(port: int, key: str) -> dict:
        cfg = resolve(
            {"model_revision": "0" * 40, "vllm_served_model_name": SERVED, "vllm_port": port, "vllm_api_key": key}
        )
        inventory = connected([("@local", {})])
        with ctx_state.use(inventory.state), ctx_host.use(inventory.get_host("@local")):
            return serving_now(cfg)

    with serving(app_like_vllm(streamed=False)) as url:
        port = int(url.rsplit(":", 1)[1])
        served, refused = answer(port, API_KEY), answer(port, "sk-wrong")
    assert served["ok"] and served["detail"].startswith(f"serving: {SERVED!r} answered a chat completion: 'Hello'")
    assert not refused["ok"] and refused["detail"].startswith(f"not serving: {url}/v1/models answered 401: ")

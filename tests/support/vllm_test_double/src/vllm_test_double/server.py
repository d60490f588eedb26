"""The HTTP side of the vLLM test double: vLLM's OpenAI-compatible routes.

Response and error shapes follow vLLM's so that clients written against vLLM
(curl checks, the OpenAI SDK, glmfleet's verify and drain steps) read them the
same way. Replies echo the last user message; token counts are word counts.
"""

import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("vllm_test_double")

OWNED_BY = "vllm-test-double"


@dataclass(frozen=True)
class ServeConfig:
    model: str
    served_model_names: list[str]
    max_model_len: int
    api_keys: list[str]  # empty: /v1 is open
    latency_s: float
    fail_requests: bool  # the wedged engine: healthy, yet every generation fails
    version: str


# vLLM's finish reasons, each counted from zero as vLLM does; and its e2e latency buckets (s).
FINISH_REASONS = ("stop", "length", "abort")
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
E2E_BUCKETS += (960.0, 1920.0, 7680.0)
# Each request in flight holds this share of the pretend engine's KV cache.
KV_CACHE_PER_REQUEST = 1 / 16


class EngineState:
    """Whether the pretend engine has loaded, and the counts /metrics shows."""

    def __init__(self) -> None:
        self.loaded = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self._succeeded = dict.fromkeys(FINISH_REASONS, 0)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._latencies: list[float] = []

    @contextmanager
    def running_request(self):
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def record_success(self, finish_reasons: list[str], usage: dict, seconds: float) -> None:
        with self._lock:
            for reason in finish_reasons:
                self._succeeded[reason] += 1
            self._prompt_tokens += usage["prompt_tokens"]
            self._generation_tokens += usage["completion_tokens"]
            self._latencies.append(seconds)

    def render_metrics(self, model_name: str) -> str:
        """The engine's metrics as vLLM's /metrics renders them (prometheus_client's text format):
        names, types and help as vLLM's, labelled with the served model name and the engine
        index, counters with their ``_total``."""
        with self._lock:
            running, succeeded = self._running, dict(self._succeeded)
            prompt, generation, latencies = self._prompt_tokens, self._generation_tokens, list(self._latencies)
        labels = {"engine": "0", "model_name": model_name}
        metrics = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                [(labels, running)],
            ),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", [(labels, 0)]),
            (
                "vllm:kv_cache_usage_perc",
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                [(labels, min(1.0, running * KV_CACHE_PER_REQUEST))],
            ),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", [(labels, prompt)]),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                [(labels, generation)],
            ),
            (
                "vllm:request_success_total",
                "counter",
                "Count of successfully processed requests.",
                [({**labels, "finished_reason": reason}, count) for reason, count in succeeded.items()],
            ),
        ]
        lines = []
        for name, kind, text, samples in metrics:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(sample_labels)} {float(value)!r}" for sample_labels, value in samples]
        name = "vllm:e2e_request_latency_seconds"
        lines += [f"# HELP {name} Histogram of e2e request latency in seconds.", f"# TYPE {name} histogram"]
        for bound in (*E2E_BUCKETS, float("inf")):
            below = sum(latency <= bound for latency in latencies)
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {float(below)!r}")
        lines.append(f"{name}_count{_labels(labels)} {float(len(latencies))!r}")
        lines.append(f"{name}_sum{_labels(labels)} {float(sum(latencies))!r}")
        return "\n".join(lines) + "\n"


class ApiError(Exception):
    """An error answered as vLLM's error JSON."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.payload = {"error": {"message": message, "type": error_type, "param": param, "code": status}}


class DoubleHTTPServer(ThreadingHTTPServer):
    """Threaded server that counts open connections, so shutdown can drain them."""

    def __init__(self, address: tuple[str, int], config: ServeConfig, state: EngineState, listen: bool = True):
        """``listen`` False: bind only, as vLLM's head does until its group has joined (a client
        is refused); ``server_activate`` listens later."""
        self.config = config
        self.state = state
        self._open_requests = 0
        self._idle = threading.Condition()
        super().__init__(address, RequestHandler, bind_and_activate=False)
        try:
            self.server_bind()
            if listen:
                self.server_activate()
        except BaseException:
            self.server_close()
            raise

    # Counted in the accept loop, before the worker thread exists, so a
    # shutdown that starts right after an accept still waits for it.
    def process_request(self, request, client_address):
        with self._idle:
            self._open_requests += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._request_done()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._request_done()

    def _request_done(self) -> None:
        with self._idle:
            self._open_requests -= 1
            self._idle.notify_all()

    def wait_until_idle(self, timeout_s: float) -> int:
        """Wait up to timeout_s for open requests to finish; return how many are left."""
        with self._idle:
            self._idle.wait_for(lambda: self._open_requests == 0, timeout_s)
            return self._open_requests


class RequestHandler(BaseHTTPRequestHandler):
    server: DoubleHTTPServer
    server_version = "vllm-test-double"
    # A client that connects and sends nothing must not hold a drain open forever.
    timeout = 30

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _routes(self) -> dict:
        return {
            "/health": {"GET": self._health},
            "/ping": {"GET": self._health, "POST": self._health},
            "/version": {"GET": self._version},
            "/metrics": {"GET": self._metrics},
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat_completions},
            "/v1/completions": {"POST": self._completions},
        }

    def _dispatch(self, method: str) -> None:
        # Read the body before any early answer: closing a socket with unread
        # data resets the connection and the client may never see the answer.
        body = self._read_body()
        path = urlsplit(self.path).path
        try:
            # Like vLLM's auth middleware: only /v1 is guarded.
            if path.startswith("/v1") and not self._authorized():
                self._send_json(401, {"error": "Unauthorized"})
                return
            handler = self._routes().get(path)
            if handler is None:
                self._send_json(404, {"detail": "Not Found"})
            elif method not in handler:
                self._send_json(405, {"detail": "Method Not Allowed"})
            else:
                handler[method](body)
        except ApiError as error:
            self._send_json(error.status, error.payload)

    def _read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        keys = self.server.config.api_keys
        if not keys:
            return True
        presented = self.headers.get("Authorization", "").encode()
        return any(hmac.compare_digest(presented, f"Bearer {key}".encode()) for key in keys)

    # --- routes -------------------------------------------------------------

    def _health(self, _body: bytes) -> None:
        self._send(200 if self.server.state.loaded.is_set() else 503, b"", "text/plain")

    def _version(self, _body: bytes) -> None:
        self._send_json(200, {"version": self.server.config.version})

    def _metrics(self, _body: bytes) -> None:
        # vLLM labels its metrics with the first served model name.
        text = self.server.state.render_metrics(self.server.config.served_model_names[0])
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _models(self, _body: bytes) -> None:
        self._require_loaded()
        config = self.server.config
        created = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": OWNED_BY,
                "root": config.model,
                "parent": None,
                "max_model_len": config.max_model_len,
            }
            for name in config.served_model_names
        ]
        self._send_json(200, {"object": "list", "data": cards})

    def _chat_completions(self, body: bytes) -> None:
        request, model, max_tokens = self._generation_request(body)
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(
                400, "`messages` must be a non-empty list of message objects.", "BadRequestError", "messages"
            )
        texts = [(m.get("role"), _content_text(m.get("content"))) for m in messages]
        last_user_text = next((text for role, text in reversed(texts) if role == "user"), "")
        reply, finish_reason = _echo(last_user_text, max_tokens)
        usage = _usage(" ".join(text for _, text in texts), reply)
        self._generate([finish_reason], usage)
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                        "stop_reason": None,
                    }
                ],
                "usage": usage,
            },
        )

    def _completions(self, body: bytes) -> None:
        request, model, max_tokens = self._generation_request(body)
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(
                400, "`prompt` must be a string or a non-empty list of strings.", "BadRequestError", "prompt"
            )
        replies = [_echo(p, max_tokens) for p in prompts]
        usage = _usage(" ".join(prompts), " ".join(text for text, _ in replies))
        self._generate([reason for _, reason in replies], usage)
        self._send_json(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": i, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
                    for i, (text, reason) in enumerate(replies)
                ],
                "usage": usage,
            },
        )

    # --- generation helpers -------------------------------------------------

    def _require_loaded(self) -> None:
        if not self.server.state.loaded.is_set():
            raise ApiError(503, "The engine has not finished loading the model.", "ServiceUnavailableError")

    def _generation_request(self, body: bytes) -> tuple[dict, str, int | None]:
        """Validate what both completion routes share; return (request, model, max_tokens)."""
        self._require_loaded()
        try:
            request = json.loads(body)
        except ValueError:
            raise ApiError(400, "The request body is not valid JSON.", "BadRequestError") from None
        if not isinstance(request, dict):
            raise ApiError(400, "The request body must be a JSON object.", "BadRequestError")
        if request.get("stream"):
            raise ApiError(
                400, 'The vLLM test double does not stream; send "stream": false.', "BadRequestError", "stream"
            )
        served = self.server.config.served_model_names
        # vLLM falls back to the first served name when the request names none.
        model = request.get("model") or served[0]
        if model not in served:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise ApiError(400, "max_tokens must be a positive integer.", "BadRequestError", "max_tokens")
        return request, model, max_tokens

    def _generate(self, finish_reasons: list[str], usage: dict) -> None:
        """Stand in for the engine: hold the request for the configured latency."""
        config, state = self.server.config, self.server.state
        started = time.monotonic()
        with state.running_request():
            time.sleep(config.latency_s)
            if config.fail_requests:
                raise ApiError(
                    500, "EngineCore encountered an issue (VLLM_TEST_DOUBLE_FAIL=error).", "InternalServerError"
                )
        state.record_success(finish_reasons, usage, time.monotonic() - started)

    # --- responses and logging ----------------------------------------------

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # One uvicorn-style line per request; headers (and so the API key) are never logged.
    def log_request(self, code="-", size="-") -> None:
        host, port = self.client_address[:2]
        log.info('%s:%s - "%s" %s', host, port, self.requestline, code)

    def log_message(self, fmt, *args) -> None:
        host, port = self.client_address[:2]
        log.warning("%s:%s - %s", host, port, fmt % args)


def _content_text(content) -> str:
    """Text of a chat message's content: a string or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    raise ApiError(400, "Message content must be a string or a list of content parts.", "BadRequestError", "messages")


def _echo(text: str, max_tokens: int | None) -> tuple[str, str]:
    """The double's deterministic reply to text, cut to max_tokens words."""
    words = text.split()
    if max_tokens is None or len(words) <= max_tokens:
        return text, "stop"
    return " ".join(words[:max_tokens]), "length"


def _usage(prompt: str, completion: str) -> dict:
    prompt_tokens, completion_tokens = len(prompt.split()), len(completion.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _labels(labels: dict[str, str]) -> str:
    """``{name="value",...}`` in name order, values escaped as the text format wants."""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in sorted(labels.items())) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

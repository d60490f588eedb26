#!/usr/bin/env python3
"""Prove that a vLLM server serves: one short real chat completion for the served name returns
text. vLLM answers it only when its engine is healthy and serves that name; where it answers
otherwise, /health and /v1/models (does it list the name?) say why. Polls until --deadline
seconds have passed (0: try once). Stdlib only: it runs on the serving host with the system Python.

The API key is read from the unit's environment file, never taken on the command line.
Exit status 0 when serving, 1 otherwise; the last line printed says what was seen.

usage: verify-vllm --base-url http://HOST:PORT --served-model-name NAME [--env-file PATH]
                   [--deadline SECONDS] [--interval SECONDS]

  --base-url           the host's own vLLM: http://127.0.0.1:8000, http://[::1]:8000, ...
  --served-model-name  the name the chat completion asks for (and /v1/models must list)
  --env-file           the unit's EnvironmentFile; VLLM_API_KEY is read from it
  --deadline           seconds to keep trying (default 600; 0: once)
  --interval           seconds between tries (default 1: a try where nothing listens yet costs
                       nothing, and a host counts as serving that much sooner); at least 5
                       after a try the server answered without serving
"""

# Every deploy runs this once per host while planning, so it stays light: plain HTTP over a
# socket (http.client's imports, email and ssl, were half of its CPU on every host and run), and
# getopt, not argparse or urllib.parse (together a quarter of what was left). It only ever asks
# the host's own vLLM, which glmfleet serves without TLS.

from __future__ import annotations

import getopt
import json
import re
import socket
import sys
import time

# What glmfleet passes: plain http, an IPv4 address, a name or a bracketed IPv6 address (with
# its zone where it is link-local: [fe80::1%eth0]), a port.
BASE_URL = re.compile(
    r"http://(?P<netloc>(?:\[(?P<ipv6>[0-9A-Fa-f:.]+(?:%[^\s/\[\]]+)?)\]|(?P<host>[^\s/:\[\]]+))"
    r":(?P<port>[0-9]{1,5}))/*"
)
# Seconds each request of a single pass may take (a pass within a longer deadline may take up to 120).
ONCE_TIMEOUT = 10.0
ANSWERED_INTERVAL = 5.0  # seconds at least between tries that the server answered with an error
OPTIONS = {"base-url": None, "served-model-name": None, "env-file": None, "deadline": "600", "interval": "1"}


def read_env_file(path: str | None) -> dict[str, str]:
    """The variables of the env file glmfleet writes: systemd's ``KEY="value"`` (in double quotes
    a backslash makes ``"``, ``\\``, ``$`` and a backquote themselves), or Docker's ``KEY=value``
    taken literally (the image runtime's)."""
    env = {}
    if not path:
        return env
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, sep, value = line.rstrip("\n").partition("=")
            if not sep or key.startswith("#"):
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = re.sub(r'\\(["\\\\$`])', r"\1", value[1:-1])
            env[key] = value
    return env


class UsageError(Exception):
    """A command line verify-vllm cannot run."""


def parse_args(argv: list[str]) -> dict[str, str]:
    """The options by name, defaults filled in (just ``help`` where that was asked); UsageError
    says what is wrong."""
    try:
        pairs, extra = getopt.getopt(argv, "h", ["help", *(f"{name}=" for name in OPTIONS)])
    except getopt.GetoptError as error:
        raise UsageError(str(error)) from None
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}")
    if any(flag in ("-h", "--help") for flag, _ in pairs):
        return {"help": ""}
    options = dict(OPTIONS)
    options.update((flag[2:], value) for flag, value in pairs)
    missing = [f"--{name}" for name, value in options.items() if value is None and name != "env-file"]
    if missing:
        raise UsageError(f"missing {' and '.join(missing)}")
    base = BASE_URL.fullmatch(options["base-url"])
    if not base or not 0 < int(base["port"]) < 65536:
        raise UsageError(
            f"--base-url {options['base-url']}: expected http://HOST:PORT, plain http to the host's own vLLM"
        )
    for name in ("deadline", "interval"):
        try:
            float(options[name])
        except ValueError:
            raise UsageError(f"--{name} {options[name]}: expected a number of seconds") from None
    return options


class ErrorAnswer(RuntimeError):
    """An HTTP answer other than 200."""


def request(
    url: str, api_key: str | None, body: dict | None, timeout: float, connect=socket.create_connection
) -> bytes:
    """One HTTP/1.0 request on a connection of its own: the payload of a 200 answer, else
    ErrorAnswer. url: a base URL that BASE_URL matches, then the path; connect: opens the
    connection, as ``socket.create_connection((host, port), timeout)`` does."""
    base = BASE_URL.match(url)
    host, port, path = base["ipv6"] or base["host"], int(base["port"]), "/" + url[base.end() :]
    data = b"" if body is None else json.dumps(body).encode()
    head = [
        f"{'GET' if body is None else 'POST'} {path} HTTP/1.0",
        f"Host: {base['netloc']}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    with connect((host, port), timeout) as connection:
        connection.sendall("\r\n".join([*head, "", ""]).encode() + data)
        status, payload = read_answer(connection, url)
    if status != 200:
        raise ErrorAnswer(f"{url} answered {status}: {payload.decode(errors='replace')[:200]}")
    return payload


def read_answer(connection: socket.socket, url: str) -> tuple[int, bytes]:
    """The status and payload of one answer, framed by its Content-Length, by chunks (uvicorn
    with httptools sends them even to HTTP/1.0 clients where a response has no length), or by
    the server closing the connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        more = connection.recv(1 << 16)
        if not more:
            if not received:
                raise ConnectionError("the server closed the connection without an answer")
            raise RuntimeError(f"{url} answered no HTTP: {received[:200]!r}")
        received += more
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, status = status_line.partition(" ")
    if not (version.startswith("HTTP/") and status[:3].isdigit()):
        raise RuntimeError(f"{url} answered no HTTP: {received[:200]!r}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    length = None if chunked or "content-length" not in headers else int(headers["content-length"])
    while not (
        length is not None and len(payload) >= length or chunked and (b"\r\n" + payload).endswith(b"\r\n0\r\n\r\n")
    ):
        more = connection.recv(1 << 16)
        if not more:
            break
        payload += more
    return int(status[:3]), unchunked(payload) if chunked else payload[:length]


def unchunked(data: bytes) -> bytes:
    """A chunked body's content."""
    content = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        content, data = content + data[:size], data[size + 2 :]
    return content


def check_once(
    base_url: str,
    served_name: str,
    api_key: str | None,
    timeout: float = ONCE_TIMEOUT,
    connect=socket.create_connection,
) -> str:
    """One pass of the check; raises with what went wrong, returns a summary. connect: as
    ``request``'s (the controller passes one that connects through the host's SSH connection).

    Every deploy makes this check on every host, so a serving host is asked one request, not
    three: the completion alone proves what /health and /v1/models would."""
    started = time.monotonic()
    body = {
        "model": served_name,
        "messages": [{"role": "user", "content": "Say hello in one word."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    try:
        payload = request(f"{base_url}/v1/chat/completions", api_key, body, timeout, connect)
    except ErrorAnswer:
        explain(base_url, served_name, api_key, timeout, connect)
        raise
    answer = json.loads(payload)
    message = answer["choices"][0]["message"]
    # Reasoning models may spend a short budget on reasoning_content alone.
    text = message.get("content") or message.get("reasoning_content") or ""
    if not text.strip():
        raise RuntimeError(f"chat completion returned no text: {answer}")
    tokens = answer.get("usage", {}).get("completion_tokens", "?")
    return f"serving: {served_name!r} answered a chat completion: {text.strip()[:60]!r} ({tokens} tokens in {time.monotonic() - started:.2f} s)"


def explain(base_url: str, served_name: str, api_key: str | None, timeout: float, connect) -> None:
    """Raise what /health or /v1/models says is wrong with a server that answered the completion
    with an error: an unhealthy engine, a refused key, a name it does not serve. Return where
    they say nothing (the completion's own answer says it best) or do not answer at all."""
    try:
        request(f"{base_url}/health", None, None, timeout, connect)
        payload = request(f"{base_url}/v1/models", api_key, None, timeout, connect)
        names = [model.get("id") for model in json.loads(payload).get("data", [])]
    except (OSError, ValueError):  # no answer, or none to read, says less than the completion's did
        return
    if served_name not in names:
        raise RuntimeError(f"/v1/models lists {names}, not {served_name!r}")


def describe(error: Exception) -> str:
    said = str(error) or type(error).__name__  # paramiko's channel times out with no message
    return f"no answer: {said}" if isinstance(error, OSError) else said  # OSError: refused, reset, timed out


def main(argv: list[str]) -> int:
    try:
        options = parse_args(argv)
    except UsageError as error:
        print(f"verify-vllm: {error} (verify-vllm --help lists the options)", file=sys.stderr)
        return 2
    if "help" in options:
        print(__doc__)
        return 0
    deadline, interval = float(options["deadline"]), float(options["interval"])
    api_key = read_env_file(options["env-file"]).get("VLLM_API_KEY")
    base_url, served_name = options["base-url"].rstrip("/"), options["served-model-name"]
    give_up = time.monotonic() + deadline
    while True:
        remaining = give_up - time.monotonic()
        try:
            print(check_once(base_url, served_name, api_key, timeout=max(ONCE_TIMEOUT, min(remaining, 120.0))))
            return 0
        except Exception as error:  # every failure is reported the same way: what was seen
            last = describe(error)
            # A server that answers without serving is not loading: a fix takes a restart, and
            # asking every second would only fill its log.
            pause = interval if isinstance(error, OSError) else max(interval, ANSWERED_INTERVAL)
        if time.monotonic() + pause > give_up:
            print(f"not serving after {deadline:.0f} s: {last}")
            return 1
        time.sleep(pause)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

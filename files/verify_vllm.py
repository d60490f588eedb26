#!/usr/bin/env python3
"""Prove that a vLLM server serves: /health is 200, /v1/models lists the served name, and one
short real chat completion returns text. Polls until --deadline seconds have passed (0: try
once). Stdlib only: it runs on the serving host with the system Python.

The API key is read from the unit's environment file, never taken on the command line.
Exit status 0 when serving, 1 otherwise; the last line printed says what was seen.

Every deploy runs it once per host while planning, so it stays light: plain HTTP over a socket
(http.client's imports, email and ssl, were half of this script's CPU on every host and run).
It only ever asks the host's own vLLM, which glmfleet serves without TLS.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from urllib.parse import urlsplit


def read_env_file(path: str | None) -> dict[str, str]:
    """Parse the KEY="value" lines glmfleet writes into a systemd EnvironmentFile."""
    env = {}
    if not path:
        return env
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if not sep or key.startswith("#"):
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            env[key] = value
    return env


def request(url: str, api_key: str | None, body: dict | None, timeout: float) -> bytes:
    """One HTTP/1.0 request on a connection of its own: the payload of a 200 answer, else
    RuntimeError."""
    parts = urlsplit(url)
    data = b"" if body is None else json.dumps(body).encode()
    head = [f"{'GET' if body is None else 'POST'} {parts.path or '/'} HTTP/1.0", f"Host: {parts.netloc}",
            "Content-Type: application/json", f"Content-Length: {len(data)}"]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as connection:
        connection.sendall("\r\n".join([*head, "", ""]).encode() + data)
        status, payload = read_answer(connection, url)
    if status != 200:
        raise RuntimeError(f"{url} answered {status}: {payload.decode(errors='replace')[:200]}")
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
    while not (length is not None and len(payload) >= length or chunked and (b"\r\n" + payload).endswith(b"\r\n0\r\n\r\n")):
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
        content, data = content + data[:size], data[size + 2:]
    return content


def check_once(base_url: str, served_name: str, api_key: str | None, timeout: float) -> str:
    """One pass of the three checks; raises with what went wrong, returns a summary."""
    request(f"{base_url}/health", None, None, timeout)
    payload = request(f"{base_url}/v1/models", api_key, None, timeout)
    names = [model.get("id") for model in json.loads(payload).get("data", [])]
    if served_name not in names:
        raise RuntimeError(f"/v1/models lists {names}, not {served_name!r}")
    started = time.monotonic()
    body = {
        "model": served_name,
        "messages": [{"role": "user", "content": "Say hello in one word."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    payload = request(f"{base_url}/v1/chat/completions", api_key, body, timeout)
    answer = json.loads(payload)
    message = answer["choices"][0]["message"]
    # Reasoning models may spend a short budget on reasoning_content alone.
    text = message.get("content") or message.get("reasoning_content") or ""
    if not text.strip():
        raise RuntimeError(f"chat completion returned no text: {answer}")
    tokens = answer.get("usage", {}).get("completion_tokens", "?")
    return f"serving: /health 200, /v1/models lists {served_name!r}, chat completion {text.strip()[:60]!r} ({tokens} tokens in {time.monotonic() - started:.2f} s)"


def describe(error: Exception) -> str:
    if isinstance(error, OSError):  # refused, reset, timed out
        return f"no answer: {error}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--env-file", help="the unit's EnvironmentFile; VLLM_API_KEY is read from it")
    parser.add_argument("--deadline", type=float, default=600, help="seconds to keep trying (0: once)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between tries")
    args = parser.parse_args(argv)

    if urlsplit(args.base_url).scheme != "http":
        parser.error(f"--base-url {args.base_url}: verify-vllm speaks plain http to the host's own vLLM")
    api_key = read_env_file(args.env_file).get("VLLM_API_KEY")
    base_url = args.base_url.rstrip("/")
    give_up = time.monotonic() + args.deadline
    while True:
        remaining = give_up - time.monotonic()
        try:
            print(check_once(base_url, args.served_model_name, api_key, timeout=max(10.0, min(remaining, 120.0))))
            return 0
        except Exception as error:  # every failure is reported the same way: what was seen
            last = describe(error)
        if time.monotonic() + args.interval > give_up:
            print(f"not serving after {args.deadline:.0f} s: {last}")
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())

"""The Hugging Face hub's refusals, answered on loopback, for the real ``hf`` CLI to meet.

A gated repository, a bad token and a rate limit cannot be met on a self-hosted mirror (olah
answers every unknown or refused repository as "not found"), and the tests may not reach the
real hub. This server answers every request the way the hub does in those cases: the status
and the ``X-Error-Code`` / ``X-Error-Message`` / ``RateLimit`` headers that huggingface_hub's
``hf_raise_for_status`` reads. Everything the tests then classify is the real CLI's output.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSALS = {
    "gated": (
        403,
        {
            "X-Error-Code": "GatedRepo",
            "X-Error-Message": "Access to model glmfleet-test/gated is restricted and you are not in the authorized list.",
        },
    ),
    "bad_token": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
    "rate_limited": (429, {"RateLimit": '"api";r=0;t=2', "RateLimit-Policy": '"fixed window";"api";q=1000;w=300'}),
}


class HubRefusal:
    def __init__(self, kind: str):
        status, headers = REFUSALS[kind]
        self.requests = 0
        self.authorizations: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            def answer(handler, body: bool) -> None:
                self.requests += 1
                self.authorizations.append(handler.headers.get("Authorization"))
                payload = json.dumps({"error": headers.get("X-Error-Message", "refused")}).encode()
                handler.send_response(status)
                for key, value in headers.items():
                    handler.send_header(key, value)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                if body:
                    handler.wfile.write(payload)

            def do_GET(handler):
                handler.answer(True)

            def do_HEAD(handler):
                handler.answer(False)

            def do_POST(handler):
                handler.answer(True)

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubRefusal:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

"""A steady, bounded request load on an OpenAI-compatible endpoint on loopback.

Workers send short chat completions back to back, each on a fresh connection, until stopped
or until max_seconds have passed (it always stops by itself). Every answer that is not a 200
with a completion counts as failed, with what was seen.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        top = "; ".join(f"{count}x {error}" for error, count in self.errors.most_common(3))
        return f"{self.ok} ok, {self.failed} failed in {self.seconds:.1f} s" + (f" ({top})" if top else "")


class Load:
    """Use as a context manager: the load runs inside the block; `.result` after it."""

    def __init__(self, base_url: str, model: str, api_key: str | None, workers: int = 4, max_seconds: float = 300):
        if not ipaddress.ip_address(urlsplit(base_url).hostname).is_loopback:
            raise ValueError(f"{base_url}: the load only ever goes to loopback")
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model, self.api_key = model, api_key
        self.workers, self.max_seconds = workers, max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _one_request(self) -> str | None:
        """None when answered with a completion, else what went wrong."""
        body = json.dumps(
            {"model": self.model, "messages": [{"role": "user", "content": "steady load"}], "max_tokens": 4}
        ).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        try:
            with _direct.open(urllib.request.Request(self.url, data=body, headers=headers), timeout=30) as response:
                answer = json.loads(response.read())
            return None if answer["choices"][0]["message"]["content"] else "empty completion"
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"
        except Exception as error:  # every other failure counts the same: no answer
            return f"{type(error).__name__}: {error}"

    def _work(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            error = self._one_request()
            with self._lock:
                if error is None:
                    self.result.ok += 1
                else:
                    self.result.failed += 1
                    self.result.errors[error] += 1

    def __enter__(self) -> Load:
        self._started = time.monotonic()
        deadline = self._started + self.max_seconds
        self._threads = [
            threading.Thread(target=self._work, args=(deadline,), daemon=True) for _ in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.result.seconds = time.monotonic() - self._started

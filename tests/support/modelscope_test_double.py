"""A test double of the ModelScope hub's file API, on loopback, for the real ``modelscope`` CLI.

Not a mirror: no maintained package serves a local directory the way the ModelScope hub does
(olah, used for Hugging Face in ``hub_mirror.py``, speaks only the Hugging Face API). This
server answers the requests that ``modelscope download`` makes for a model at a revision --
``modelscope==1.40.2``, whose ``modelscope`` command is ``modelscope_hub.cli.main:run_cmd``
from the ``modelscope-hub`` package it depends on (checked against modelscope-hub 0.5.1):

``GET /api/v1/repos/internalAccelerationInfo``
    the region probe the downloader makes first (0.2 s timeout); answered with no region.
``GET /api/v1/models/OWNER/NAME/repo/files?Revision=REV&Recursive=True[&Root=DIR]``
    the listing: ``{"Code": 200, "Data": {"Files": [...]}, "Success": true}``, one entry per
    file and directory with ``Name``, ``Path``, ``Type`` ("blob"/"tree"), ``Size`` and
    ``Sha256`` -- the fields the CLI reads (``Path``, ``Type``, ``Size``, ``Sha256``).
``GET /api/v1/models/OWNER/NAME/repo?Revision=REV&FilePath=PATH``
    the file, with ``Content-Length`` and single-range ``Range`` support (206 +
    ``Content-Range``; 416 + ``Content-Range: bytes */SIZE`` past the end), which the CLI's
    resume of a ``.incomplete`` file and its parallel ranged download rely on.
``GET /api/v1/models/OWNER/NAME``
    repository info; the CLI asks for it when a ``Root``-scoped listing comes back 404.
``GET /api/v1/models/OWNER/NAME/revisions``
    the branch list older CLIs (modelscope < 1.38) check a revision against.

Repositories are laid out as ``repos_dir/OWNER/NAME/REVISION/<files>``. A missing repository
is answered as the hub does (HTTP 404, ``{"Code": 10010205001, "Message": "获取模型信息失败，
信息：record not found", "Success": false}``). A missing revision of an existing repository is
answered as the hub has been measured to answer it (a third party's measurement, not checked
from here): the listing is HTTP 200 with ``"Files": null`` -- which the CLI takes as an empty
snapshot and exits 0 -- and a file at that revision is a 404. ``strict_revisions=True``
answers the listing with a 404 instead.

``mode`` imitates refusals on every ``/api/v1`` request: ``"not_found"`` (404, the hub's
record-not-found body), ``"rate_limited"`` (429, with ``Retry-After``) and ``"unauthorized"``
(401). The 401 and 429 bodies use the hub's JSON envelope, but their ``Message`` texts are
this double's own: classify the CLI's output by its stable parts (``[E3001] [401]``,
``[E1021] [429]``, ``[E3020] [404]``), not by these texts.

Point the CLI here with ``MODELSCOPE_ENDPOINT`` or ``MODELSCOPE_DOMAIN`` set to ``.url``
(``.domain``): a bare ``host:port`` is made ``https://host:port`` by the CLI, so the scheme must
be part of the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

API = "/api/v1"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".msgpack", ".h5")

REFUSALS = {
    "not_found": (404, {"Code": 10010205001, "Message": "获取模型信息失败，信息：record not found"}, {}),
    "rate_limited": (429, {"Code": 429, "Message": "Too many requests, please retry later"}, {"Retry-After": "1"}),
    "unauthorized": (401, {"Code": 401, "Message": "Unauthorized: the access token is invalid or has expired"}, {}),
}
REPO_NOT_FOUND = REFUSALS["not_found"][1]
REVISION_NOT_FOUND = {"Code": 10010205001, "Message": "获取模型版本失败，信息：record not found"}
FILE_NOT_FOUND = {"Code": 10990101007, "Message": "获取模型文件失败，文件内容为空"}

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_id(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelScopeTestDouble:
    """``with ModelScopeTestDouble(repos_dir) as hub:`` serves ``repos_dir`` on ``hub.url``.

    ``mode`` (settable while running): None, "not_found", "rate_limited" or "unauthorized".
    ``requests``: the path (with query) of every request seen; ``authorizations``: each one's
    ``Authorization`` header (the CLI sends ``Bearer <MODELSCOPE_API_TOKEN>``); ``ranges``:
    (path, Range header) of every file request. ``interrupt(after_bytes)`` cuts the next file response(s) short;
    ``throttle`` (bytes/s) slows file bodies so a download can be killed midway.
    """

    def __init__(
        self,
        repos_dir: Path,
        port: int = 0,
        mode: str | None = None,
        *,
        retry_after: str | None = "1",
        strict_revisions: bool = False,
        sha256_only_lfs: bool = False,
        throttle: int | None = None,
    ):
        if mode not in (None, *REFUSALS):
            raise ValueError(f"mode must be None or one of {sorted(REFUSALS)}")
        self.repos_dir = Path(repos_dir)
        self.mode = mode
        self.retry_after = retry_after
        self.strict_revisions = strict_revisions
        self.sha256_only_lfs = sha256_only_lfs
        self.throttle = throttle
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str | None]] = []
        self.authorizations: list[str | None] = []
        self._cuts: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(handler):
                double._handle(handler, body=True)

            def do_HEAD(handler):
                double._handle(handler, body=False)

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.domain = self.url  # MODELSCOPE_DOMAIN keeps a scheme it is given; without one it means https
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ModelScopeTestDouble:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict[str, str]:
        """The variables that point the CLI here (use on top of a clean environment)."""
        return {"MODELSCOPE_ENDPOINT": self.url}

    def interrupt(self, after_bytes: int, times: int = 1, name: str | None = None) -> None:
        """The next ``times`` file responses (of the file called ``name``, if given) announce the
        full length, send ``after_bytes`` of the body and close the connection (a transfer cut
        midway)."""
        with self._lock:
            self._cuts.extend([(after_bytes, name)] * times)

    # --- answers -----------------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        payload: bytes,
        body: bool,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json;charset=UTF-8",
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _json(self, h, status: int, data: dict, body: bool, headers: dict[str, str] | None = None) -> None:
        request_id = str(uuid.uuid4())
        envelope = {**data, "RequestId": request_id, "Success": status < 400}
        if status < 400:
            envelope = {"Code": 200, "Data": data, "Message": "success", "RequestId": request_id, "Success": True}
        self._send(
            h,
            status,
            json.dumps(envelope, ensure_ascii=False).encode(),
            body,
            {"X-Request-Id": request_id, **(headers or {})},
        )

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        with self._lock:
            self.requests.append(h.path)
            self.authorizations.append(h.headers.get("Authorization"))
        split = urlsplit(h.path)
        path, query = unquote(split.path), {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if not path.startswith(API + "/"):
            return self._send(h, 404, b"404 page not found", body, content_type="text/plain")
        if self.mode is not None:
            status, data, headers = REFUSALS[self.mode]
            if self.mode == "rate_limited":
                headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return self._json(h, status, data, body, headers)
        parts = path[len(API) + 1 :].split("/")
        if parts == ["repos", "internalAccelerationInfo"]:
            return self._json(h, 200, {"InternalRegionQueryAddress": ""}, body)
        if len(parts) < 3 or parts[0] != "models":
            return self._json(h, 404, REPO_NOT_FOUND, body)
        owner, name, rest = parts[1], parts[2], parts[3:]
        repo = self.repos_dir / owner / name
        if not owner or not name or owner.startswith(".") or name.startswith(".") or not repo.is_dir():
            return self._json(h, 404, REPO_NOT_FOUND, body)
        if rest == []:
            return self._json(
                h,
                200,
                {
                    "Name": name,
                    "Path": owner,
                    "Id": zlib.crc32(f"{owner}/{name}".encode()),
                    "Revision": "master",
                    "Visibility": 5,
                },
                body,
            )
        if rest == ["revisions"]:
            branches = [
                {"Revision": r.name, "CreatedAt": int(r.stat().st_mtime)} for r in sorted(repo.iterdir()) if r.is_dir()
            ]
            return self._json(h, 200, {"RevisionMap": {"Branches": branches, "Tags": []}}, body)
        revision = query.get("Revision") or "master"
        tree = repo / revision
        known = bool(revision) and "/" not in revision and not revision.startswith(".") and tree.is_dir()
        if rest == ["repo", "files"]:
            if not known:
                if self.strict_revisions:
                    return self._json(h, 404, REVISION_NOT_FOUND, body)
                return self._json(h, 200, {"Files": None}, body)  # the hub's answer to an unknown revision
            recursive = query.get("Recursive", "False").lower() == "true"
            return self._json(
                h, 200, {"Files": self._listing(tree, revision, query.get("Root") or "", recursive)}, body
            )
        if rest == ["repo"]:
            file_path = query.get("FilePath", "")
            target = (tree / file_path) if known and file_path else None
            if target is None or ".." in Path(file_path).parts or not target.is_file():
                return self._json(h, 404, FILE_NOT_FOUND, body)
            return self._file(h, target, body)
        return self._json(h, 404, {"Code": 404, "Message": f"no route for {path}"}, body)

    def _entry(self, tree: Path, path: Path, revision: str) -> dict:
        relative = path.relative_to(tree).as_posix()
        if path.is_dir():
            return {
                "Name": path.name,
                "Path": relative,
                "Type": "tree",
                "Size": 0,
                "Mode": "40000",
                "Revision": revision,
                "Sha256": "",
                "IsLFS": False,
            }
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = (_sha256(path), _git_blob_id(path, stat.st_size))
        sha256, blob = self._hashes[key]
        lfs = path.suffix in LFS_SUFFIXES
        return {
            "Name": path.name,
            "Path": relative,
            "Type": "blob",
            "Size": stat.st_size,
            "Mode": "100644",
            "Id": blob,
            "Revision": revision,
            "IsLFS": lfs,
            "Sha256": sha256 if lfs or not self.sha256_only_lfs else "",
            "CommittedDate": int(stat.st_mtime),
            "CommitMessage": "upload",
        }

    def _listing(self, tree: Path, revision: str, root: str, recursive: bool) -> list[dict]:
        base = tree / root.strip("/") if root.strip("/") else tree
        if ".." in Path(root).parts or not base.is_dir():
            return []
        found = sorted(base.rglob("*") if recursive else base.iterdir())
        return [self._entry(tree, p, revision) for p in found if ".git" not in p.relative_to(tree).parts]

    def _file(self, h: BaseHTTPRequestHandler, target: Path, body: bool) -> None:
        size = target.stat().st_size
        spec = h.headers.get("Range")
        with self._lock:
            self.ranges.append((h.path, spec))
        start, end, status = 0, size - 1, 200
        headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{target.name}"'}
        match = _RANGE.fullmatch(spec.strip()) if spec else None
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or start > end:
                return self._send(h, 416, b"", body, {"Content-Range": f"bytes */{size}"}, "text/plain")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if not body:
            return
        with self._lock:
            match = next((i for i, (_, name) in enumerate(self._cuts) if name in (None, target.name)), None)
            cut = self._cuts.pop(match)[0] if match is not None else None
        remaining = length if cut is None else min(length, cut)
        with open(target, "rb") as f:
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(remaining, 64 * 1024))
                if not chunk:
                    break
                try:
                    h.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    h.close_connection = True
                    return
                remaining -= len(chunk)
                if self.throttle:
                    time.sleep(len(chunk) / self.throttle)
        if cut is not None and cut < length:
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(2)
            except OSError:
                pass


def make_repo(repos_dir: Path, repo_id: str, revision: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` (path -> bytes) out as revision ``revision`` of ``repo_id``; returns its directory."""
    tree = Path(repos_dir) / repo_id / revision
    for relative, data in files.items():
        target = tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    os.utime(tree)
    return tree

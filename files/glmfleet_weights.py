#!/usr/bin/env python3
"""glmfleet-weights: fetch, verify and mark one model revision in one directory on this host.

Installed on every host by the model_weights role (standard library only: the host's python3
runs it). The deploy reads the host-local state file (its weights fact decides with
``completion`` below), runs ``sync`` where the weights are not complete, and the vLLM unit runs
``check`` before it starts.

Integrity: a manifest (``DIR/.glmfleet/manifest.json``) lists every file of the revision with
its size and a digest from the hub's own metadata (the LFS sha256, or the git blob id of small
files) or, where the source has none, the sha256 computed once on the seed. Each host hashes
its copy against it and records, per file, the stat (size, mtime, ctime, inode) it verified in
a host-local state file; only when every file is verified is the state marked complete. A
later run re-hashes only files whose stat changed (any write, truncation or replacement
changes ctime or inode), so a complete host costs one stat per file and nothing else.

A run withdraws the completion mark before it changes anything, so an interrupted run leaves
a host that is not complete; transfers write into temporary files (hf's ``.incomplete``,
rsync's ``--partial-dir``), so a file at its final path is never half written.

As root it writes only below directories that root alone can change (``safe_directory``): no
link another user planted is followed, and no mode is changed on what it did not make. Files
it makes are world-readable (umask 022): vLLM reads them as its own user. With ``--source
path`` it writes nothing at all: a file that does not match is reported, never removed.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

MANIFEST = ".glmfleet/manifest.json"
# Not part of the model: hf's download metadata and locks, rsync's partial files, our manifest;
# and the hub CLIs' unfinished downloads (hf's and modelscope's ``*.incomplete``).
NOT_MODEL_FILES = (".cache/", ".glmfleet/", ".rsync-partial/")
UNFINISHED_SUFFIX = ".incomplete"
CHUNK = 8 << 20


class Failure(Exception):
    """A failure with what to do about it; printed as one clear message, exit status 1."""


def safe_directory(directory: Path) -> None:
    """Refuse to write below ``directory`` unless every directory above it (links resolved) and
    the directory itself, where it exists, is root's and writable by root alone: otherwise
    another user could swap a component for a link between a check and a write. Above the
    deepest existing one, a root-owned sticky directory (/tmp) is fine: others cannot rename
    what is in it."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    real = Path(os.path.realpath(existing))
    for place in [real, *real.parents]:
        info = place.stat()
        shared = info.st_mode & 0o022 and (place == real or not info.st_mode & 0o1000)
        if info.st_uid != 0 or shared:
            raise Failure(
                f"{place} (at or above {directory}) is not root's alone (owner uid {info.st_uid}, mode "
                f"{info.st_mode & 0o7777:o}): glmfleet writes weights only where no other user can change the "
                "directories; set model_dir (or model_root) to such a place"
            )


# --- selection, digests, manifests -------------------------------------------------------------


def selected(path: str, include: list[str], exclude: list[str]) -> bool:
    """The hub CLI's own rule (huggingface_hub's filter_repo_objects): case-sensitive fnmatch,
    a pattern ending in '/' means everything under it."""

    def grow(patterns):
        return [p + "*" if p.endswith("/") else p for p in patterns]

    if include and not any(fnmatch.fnmatchcase(path, p) for p in grow(include)):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in grow(exclude))


def digest_file(path: Path, kind: str) -> str:
    """``sha256`` of the content, or the git blob id (sha1 over ``blob <size>\\0`` + content)."""
    if kind == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(directory: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if not relative.startswith(NOT_MODEL_FILES) and not relative.endswith(UNFINISHED_SUFFIX):
                found.append(relative)
    return sorted(found)


def manifest_from_hub_tree(directory: Path, model: str, revision: str, include, exclude) -> dict | None:
    """The hub's metadata as huggingface_hub >= 1.28 leaves it: ``.cache/huggingface/trees/<commit>.json``."""
    tree = directory / ".cache" / "huggingface" / "trees" / f"{revision}.json"
    if not tree.exists():
        return None
    entries = json.loads(tree.read_text())["files"]
    files = {}
    for path, entry in entries.items():
        if not selected(path, include, exclude):
            continue
        if "lfs_sha256" in entry:
            files[path] = {"size": entry["lfs_size"], "sha256": entry["lfs_sha256"]}
        else:
            files[path] = {"size": entry["size"], "git_blob": entry["blob_id"]}
    return {"format": 1, "model": model, "revision": revision, "origin": "hub tree", "files": files}


def computed_manifest(directory: Path, model: str, revision: str, include, exclude) -> dict:
    files = {}
    for path in model_files(directory):
        if selected(path, include, exclude):
            files[path] = {"size": (directory / path).stat().st_size, "sha256": digest_file(directory / path, "sha256")}
    return {"format": 1, "model": model, "revision": revision, "origin": "computed on the seed", "files": files}


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


# --- the host-local state: which files were verified, as what stat -----------------------------


def stat_of(path: Path) -> list[int] | None:
    try:
        s = path.stat()
    except FileNotFoundError:
        return None
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]


def completion(data: dict, key: str, stat: Callable[[str], list[int] | None]) -> dict:
    """Whether a revision is complete, from its state file's data (empty: no file) and ``stat``
    (path in the model directory -> its stat_of now). Also the deploy's weights fact: it reads
    the state file and the files' stats with cat and find, and calls this on the controller
    (no Python started on every host on every run)."""
    if not data:
        return {"complete": False, "reason": "never fetched", "changed": []}
    if data.get("key") != key:
        return {"complete": False, "reason": "another revision or file selection", "changed": []}
    if not data.get("complete"):
        return {"complete": False, "reason": "unfinished", "changed": []}
    # A file whose stat differs from the one verified (or that is gone) may differ in content.
    changed = [path for path, seen in data.get("verified", {}).items() if stat(path) != seen]
    return {
        "complete": not changed,
        "reason": "files changed since verified" if changed else "complete",
        "changed": changed,
    }


class State:
    def __init__(self, path: Path, key: str):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        if data.get("key") != key:
            data = {"key": key, "verified": {}}
        self.data = data
        self.data.setdefault("verified", {})

    def save(self, **fields) -> None:
        self.data.update(fields)
        write_json(self.path, self.data)


# --- progress --------------------------------------------------------------------------------


def tree_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # a temporary file renamed between listing and stat
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Prints bytes arrived, rate and ETA every ``interval`` seconds while a transfer runs, by
    watching the directory grow (the same for every source: hf, modelscope, rsync)."""

    def __init__(self, directory: Path, expected: int, interval: float, label: str):
        self.directory, self.expected, self.interval, self.label = directory, expected, interval, label
        self.stop = threading.Event()
        self.start_bytes = tree_bytes(directory)
        self.started = time.monotonic()

    def arrived(self) -> int:
        return max(0, tree_bytes(self.directory) - self.start_bytes)

    def line(self) -> str:
        done, elapsed = self.arrived(), time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0
        text = f"{self.label}: {human(done)}"
        if self.expected:
            text += f" of {human(self.expected)} ({min(100, 100 * done / self.expected):.0f}%)"
        text += f", {human(rate)}/s"
        if self.expected and done >= self.expected / 100 and done < self.expected:  # a rate worth extrapolating
            text += f", ETA {int((self.expected - done) / rate)} s"
        return text

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            print(self.line(), flush=True)

    def __enter__(self) -> Progress:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


# --- error classification of the hub CLIs' output -------------------------------------------------

# (kind, pattern in the CLI's output, what to do). First match wins: a rate-limited listing is
# reported by hf as "Local entry not found. 429 ...", so the 429 must be looked at before "not found".
# The modelscope CLI (modelscope-hub) says "error: [E<code>] [<HTTP status>] ...": its codes are
# matched, not its texts.
CLASSES = (
    (
        "disk full",
        r"No space left on device|Errno 28",
        "the filesystem of model_dir filled up: free space there, or point model_dir at a larger filesystem",
    ),
    (
        "gated model",
        r"requires approval|Cannot access gated repo|GatedRepo",
        "accept the model's license on its hub page with the account whose token is in hf_token, then re-run",
    ),
    (
        "rate limited",
        r"429 Too Many Requests|rate limit|\[E1021\]|\[429\]",
        "the hub limits requests per IP: wait for the window to pass, set hf_token (higher limits), "
        "use model_source 'peer' so only one host fetches, or an hf_endpoint mirror",
    ),
    (
        "bad token",
        r"Invalid credentials in Authorization header|Invalid user token|401 Unauthorized|Invalid token|\[E3001\]|\[401\]",
        "the hub refused the token: check hf_token (a read token of an account with access)",
    ),
    (
        "not found",
        r"Repository Not Found|Revision Not Found|Entry Not Found|Local entry not found|404|\[E3020\]|record not found",
        "check model and model_revision (a commit of that repository); a private repository also needs hf_token",
    ),
    (
        "hub unreachable",
        r"Connection refused|ConnectError|ConnectTimeout|Name or service not known|"
        r"Temporary failure in name resolution|Network is unreachable|timed out",
        "this host cannot reach the hub: check hf_endpoint and the host's network or proxy",
    ),
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def classify(output: str) -> tuple[str, str]:
    text = ANSI.sub("", output)
    for kind, pattern, advice in CLASSES:
        if re.search(pattern, text):
            return kind, advice
    return "failed", "see the output above"


def run_cli(argv: list[str], env: dict[str, str], what: str) -> None:
    """Run a hub CLI; on failure raise a Failure that names the classified cause."""
    process = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    if process.returncode != 0:
        kind, advice = classify(process.stdout)
        tail = "\n".join(ANSI.sub("", process.stdout).strip().splitlines()[-12:])
        raise Failure(f"{what} failed: {kind}: {advice}\n--- last lines of its output:\n{tail}")


def hf_size(text: str) -> int:
    """``hf download --dry-run --json`` sizes ('135.0', '8.9K', '68.2M'): powers of 1000."""
    match = re.fullmatch(r"([0-9.]+)\s*([KMGTPEZ]?)B?", text.strip())
    if not match:
        raise Failure(f"cannot read the size {text!r} in the hf CLI's dry-run output")
    return int(float(match.group(1)) * 1000 ** " KMGTPEZ".index(match.group(2) or " "))


# --- sources ---------------------------------------------------------------------------------


class Source:
    def __init__(self, args):
        self.args = args
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "MODELSCOPE_"))}
        if (
            args.env_file
        ):  # the token and endpoint, read here and handed over in the environment: never on a command line
            self.env.update(json.loads(Path(args.env_file).read_text()))


class Hub(Source):
    """``hf download``: the listing first (sizes for the disk check), then the transfer."""

    def __init__(self, args):
        super().__init__(args)
        self.env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=args.cli_home)

    def argv(self, *extra: str) -> list[str]:
        a = self.args
        argv = [a.cli, "download", a.model, "--revision", a.revision, "--local-dir", str(a.dir)]
        for pattern in a.include:
            argv += ["--include", pattern]
        for pattern in a.exclude:
            argv += ["--exclude", pattern]
        return argv + list(extra)

    def sizes(self) -> dict[str, int]:
        process = subprocess.run(
            self.argv("--dry-run", "--json"),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
        if process.returncode != 0:
            kind, advice = classify(process.stdout + process.stderr)
            raise Failure(
                f"listing {self.args.model}@{self.args.revision} on the hub failed: {kind}: {advice}\n"
                + "\n".join(ANSI.sub("", process.stderr).strip().splitlines()[-8:])
            )
        # "-": present and current, nothing to download.
        return {e["file"]: hf_size(e["size"]) for e in json.loads(process.stdout) if e["size"] != "-"}

    def fetch(self) -> None:
        run_cli(self.argv(), self.env, f"hf download {self.args.model}")

    def manifest(self) -> dict:
        a = self.args
        manifest = manifest_from_hub_tree(a.dir, a.model, a.revision, a.include, a.exclude)
        if manifest is None:
            raise Failure(
                f"hf left no {a.dir}/.cache/huggingface/trees/{a.revision}.json: "
                "the hf CLI must be huggingface_hub >= 1.28 (hf_cli_version)"
            )
        return manifest


class ModelScope(Source):
    """``modelscope download``: it verifies each file's sha256 itself; our manifest is computed
    once from the result on the seed. Its settings and session file go to the CLI's home, not
    root's (``MODELSCOPE_HOME``)."""

    def __init__(self, args):
        super().__init__(args)
        self.env.update(MODELSCOPE_CACHE=args.cli_home, MODELSCOPE_HOME=args.cli_home)

    def sizes(self) -> dict[str, int] | None:
        return None  # the CLI has no listing: the disk check can only ask for the margin

    def fetch(self) -> None:
        a = self.args
        argv = [a.cli, "download", a.model, "--revision", a.revision, "--local-dir", str(a.dir)]
        if a.include:
            argv += ["--include", *a.include]
        if a.exclude:
            argv += ["--exclude", *a.exclude]
        run_cli(argv, self.env, f"modelscope download {a.model}")

    def manifest(self) -> dict:
        a = self.args
        manifest = computed_manifest(a.dir, a.model, a.revision, a.include, a.exclude)
        if not manifest["files"]:
            # The hub answers a revision it does not have with an empty listing, and the CLI then
            # exits 0 having fetched nothing.
            raise Failure(
                f"modelscope download {a.model}@{a.revision} fetched no file: not found: the hub lists none at "
                "that revision (or none the include/exclude patterns keep); check model and model_revision"
            )
        return manifest


class Given(Source):
    """``path`` (already on the host) and ``control`` (pushed by the control node): nothing to
    fetch here; the manifest is the one in the directory (or the hub tree hf left there)."""

    def sizes(self) -> dict[str, int] | None:
        manifest = self.manifest()
        return {p: e["size"] for p, e in manifest["files"].items()} if manifest else None

    def fetch(self) -> None:
        pass

    def manifest(self) -> dict | None:
        a = self.args
        return read_manifest(a.dir) or manifest_from_hub_tree(a.dir, a.model, a.revision, a.include, a.exclude)


SOURCES = {"hf": Hub, "modelscope": ModelScope, "control": Given, "path": Given}


# --- the steps ---------------------------------------------------------------------------------


def free_bytes(directory: Path) -> tuple[int, Path]:
    existing = directory
    while not existing.exists():
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize, existing


def preflight(args, sizes: dict[str, int] | None) -> None:
    """Free space on the target filesystem >= what is still to come + margin, before any transfer."""
    free, where = free_bytes(args.dir)
    if sizes is None:
        missing, total = 0, 0
    else:
        total = sum(sizes.values())
        missing = sum(
            size
            for path, size in sizes.items()
            if stat_of(args.dir / path) is None or (args.dir / path).stat().st_size != size
        )
    need = missing + args.margin_bytes
    if free < need:
        raise Failure(
            f"not enough disk for {args.model}@{args.revision[:12]} in {args.dir}: "
            f"{human(missing)} still to fetch (of {human(total)}) + {human(args.margin_bytes)} margin "
            f"= {human(need)} needed, {human(free)} free on the filesystem of {where}. "
            "Free space there, set model_dir to a larger filesystem, or lower model_disk_margin_gb. Nothing was transferred."
        )
    args.expected = missing


def mismatch(target: Path, entry: dict) -> str | None:
    """What of ``target`` differs from its manifest entry ("size", "sha256", "git_blob"), or None."""
    kind = "sha256" if "sha256" in entry else "git_blob"
    if target.stat().st_size != entry["size"]:
        return "size"
    return None if digest_file(target, kind) == entry[kind] else kind


def verify(args, state: State, manifest: dict, everything: bool) -> list[str]:
    """Hash what is not known good; delete what is wrong (report it, with ``--source path``,
    whose files are not ours to delete). Returns the files missing or wrong."""
    bad, verified = [], state.data["verified"]
    for path, entry in sorted(manifest["files"].items()):
        target = args.dir / path
        seen = stat_of(target)
        if seen is None:
            bad.append(path)
            verified.pop(path, None)
            continue
        if not everything and verified.get(path) == seen:
            continue
        wrong = mismatch(target, entry)
        if wrong is None:
            verified[path] = seen
        else:
            if args.source == "path":
                print(f"{path}: {wrong} does not match the manifest", flush=True)
            else:
                print(f"{path}: {wrong} does not match the manifest; removed", flush=True)
                target.unlink()
            verified.pop(path, None)
            bad.append(path)
        state.save()
    return bad


def mark_complete(state: State, args, manifest: dict) -> None:
    state.save(
        complete=True,
        model=args.model,
        revision=args.revision,
        manifest=manifest_digest(manifest),
        files=len(manifest["files"]),
        bytes=sum(e["size"] for e in manifest["files"].values()),
    )
    print(
        f"{args.model}@{args.revision[:12]}: complete, {len(manifest['files'])} files verified against the manifest "
        f"({manifest['origin']})",
        flush=True,
    )


def sync(args) -> None:
    args.dir = Path(args.dir)
    state = State(Path(args.state), args.key)
    # Withdraw the mark first: whatever happens from here on, an unfinished host is not complete.
    state.save(complete=False)
    source = SOURCES[args.source](args)
    label = f"{args.model}@{args.revision[:12]}"
    origin = {
        "hf": f"the hub ({source.env.get('HF_ENDPOINT', 'huggingface.co')})",
        "modelscope": "ModelScope",
        "control": "the control node",
        "path": "this host",
    }[args.source]
    everything = args.verify == "always"

    if args.source == "path":
        if not args.dir.is_dir():
            raise Failure(f"model_source 'path': {args.dir} does not exist on this host")
    else:
        safe_directory(args.dir)
    if args.phase == "receive":  # the control node pushes the manifest next
        (args.dir / ".glmfleet").mkdir(parents=True, exist_ok=True)
        return
    if args.phase in ("prepare", "all"):
        if args.source != "path":
            args.dir.mkdir(parents=True, exist_ok=True)
        # Check what is already there before fetching: a wrong file is deleted, so it is fetched again.
        known = Given(args).manifest()
        if known and known["revision"] == args.revision:
            verify(args, state, known, everything)
        if args.source != "path":  # nothing is fetched: no disk is needed
            preflight(args, source.sizes())
        if args.phase == "prepare":
            return

    bad = []
    for attempt in (1, 2) if args.phase == "all" and args.source not in ("control", "path") else ():
        print(
            f"{label}: fetching {human(args.expected)} from {origin}",
            flush=True,
        )
        with Progress(args.dir, args.expected, args.progress_interval, label) as progress:
            source.fetch()
        print(progress.line(), "(transfer done)", flush=True)
        write_json(args.dir / MANIFEST, source.manifest())
        bad = verify(args, state, read_manifest(args.dir), everything)
        if not bad:
            break
        print(
            f"attempt {attempt}: {len(bad)} file(s) missing or wrong, fetching them again: {', '.join(bad)}", flush=True
        )
    manifest = Given(args).manifest()
    if manifest is None:
        raise Failure(
            f"no manifest in {args.dir}: neither {MANIFEST} nor .cache/huggingface/trees/{args.revision}.json; "
            "write one with `glmfleet-weights manifest DIR --model M --revision R` where the files are known good"
        )
    bad = verify(args, state, manifest, everything=False)
    if bad:
        raise Failure(f"{len(bad)} file(s) of {label} are missing or do not match the manifest: {', '.join(bad)}")
    mark_complete(state, args, manifest)


# --- a host's part in a fan-out ----------------------------------------------------------------

INCOMING = ".glmfleet/incoming"
# A copy from a peer that answers nothing (a cut link) fails, so that the control node can ask
# another; what arrived stays staged, and the next copy, from any peer, appends to it. ssh finds
# the silence: its probes go unanswered for PEER_ALIVE_INTERVAL_S x PEER_ALIVE_COUNT.
PEER_IO_TIMEOUT_S = 20  # a give whose receiver takes nothing for this long ends
PEER_ALIVE_INTERVAL_S = 5
PEER_ALIVE_COUNT = 3
PEER_CONNECT_TIMEOUT_S = 10
# One ssh connection to each peer carries every copy from it; closed when this host's part ends,
# or this long after its last copy should the part end without closing it.
PEER_CONNECTION_KEPT_S = 10
# A giver hands on a file it is still receiving: it waits for the next bytes this long at most
# (its own copy resumes from another peer meanwhile, or has failed for good).
GIVE_STALL_S = 30
GIVE_POLL_S = 0.05
# How ``give`` ended, for the receiver: DROPPED means the giver's copy was removed while it gave
# it (it did not match): the bytes given so far are worthless.
GIVE_REFUSED, GIVE_DROPPED, GIVE_STALLED = 2, 3, 4
# Copies are read one at a time, each at the link's speed; the next one's session opens when the
# one being read has this long left, so that its set-up (the ssh session, the peer's ``give``
# starting) overlaps the last bytes of that one rather than leaving the link idle.
NEXT_COPY_LEAD_S = 1.0
NEXT_COPY_POLL_S = 0.05
# The seed looks for what the origin delivered this often; a file the control node's rsync has
# begun is announced within ARRIVAL_POLL_S, since the chains behind the seed wait for the word
# (checked every 0.5 s, that word came 0.25 s late on average: a tenth of a 2.4 s file).
ORIGIN_POLL_S = 0.5
ARRIVAL_POLL_S = 0.05


def safe_relative(path: str) -> bool:
    """A manifest's file name that stays inside the model directory and out of glmfleet's own."""
    parts = Path(path).parts
    return bool(parts) and not Path(path).is_absolute() and ".." not in parts and not path.startswith(NOT_MODEL_FILES)


class Agent:
    """This host's part in a fan-out (``swarm``), driven by the control node over standard input
    and output, one JSON object a line each way; words for people go to standard error.

    The control node says (``do``): ``manifest`` (the revision's, to a host that has none),
    ``fetch`` (one file from one peer; a second one waits behind the copy being read),
    ``cancel`` (drop a copy: its peer is slow),
    ``recheck`` (hash every file again: a peer received one of
    ours wrong), ``origin_done`` (its push to this host, the seed, ended), ``leave``, ``stop``.
    This host says (``event``): ``hello`` (complete or not, the manifest it has), ``ready`` (the
    manifest, the files verified here, the disk checked: it may receive), ``arriving`` (the
    control node's push has begun a file here: it may be handed on as it lands), ``verified`` (a
    file is verified), ``failed`` (a copy failed; ``bad``: the peer's bytes did not match
    the manifest), ``rechecked`` (the files a recheck found wrong and removed), ``origin`` (the
    seed's fetch from the origin ended, with the error if it failed), ``complete``.

    A copy from a peer (the peer's ``give``, over ssh) lands in DIR/.glmfleet/incoming/, is hashed
    there and only then moved to its place. While it lands, this host may hand it on to another
    (its own ``give`` follows the staged file), and that host hashes its whole copy in turn: a
    byte handed on early is never trusted early, and a copy that does not match here is removed,
    which ends every copy taken from it. An interrupted copy is appended to by the next one, from
    whichever peer (from the staged size on)."""

    def __init__(self, args):
        self.args = args
        args.dir = Path(args.dir)
        self.label = f"{args.model}@{args.revision[:12]}"
        self.state = State(Path(args.state), args.key)
        self.manifest: dict | None = None
        self.complete = False
        self.origin_running = False
        self.status = 1
        self.progress: Progress | None = None
        self.peers_used: set[tuple[str, str]] = set()
        self.staged_verified: set[str] = set()  # verified, still staged: the origin's rsync may touch them
        # The copies from peers under way: file -> its ssh (None: not started yet, it waits its turn).
        self.copying: dict[str, subprocess.Popen | None] = {}
        self.copy_lock = threading.Lock()
        self.reading = Reading()  # the copy read now: one at a time
        self.state_lock = threading.Lock()  # the state file, the manifest
        self.sweep_lock = threading.Lock()  # one pass over the files at a time
        self.send_lock = threading.Lock()
        # The protocol keeps standard output; whatever is printed for people goes to standard error.
        self.channel = os.fdopen(os.dup(1), "w")
        sys.stdout = sys.stderr

    def send(self, event: str, **fields) -> None:
        with self.send_lock:
            self.channel.write(json.dumps({"event": event, **fields}) + "\n")
            self.channel.flush()

    def verified(self) -> list[str]:
        with self.state_lock:
            return sorted(path for path in self.manifest["files"] if path in self.state.data["verified"])

    # -- the steps ------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        if os.getsid(0) != os.getpid():  # sshd makes it a session leader: its group is its own
            os.setpgrp()  # a process group of its own, ended with it (see the end)
        safe_directory(a.dir)
        known = Given(a).manifest()
        known = known if known and known["revision"] == a.revision else None
        if known and completion(self.state.data, a.key, lambda path: stat_of(a.dir / path))["complete"]:
            self.manifest, self.complete = known, True
            self.send("hello", complete=True, manifest=known, verified=sorted(known["files"]))
        else:
            # Withdrawn first: whatever happens from here on, an unfinished host is not complete.
            self.state.save(complete=False)
            (a.dir / ".glmfleet").mkdir(parents=True, exist_ok=True)
            self.send("hello", complete=False, manifest=known)
            if a.origin in ("hf", "modelscope"):
                # What is here is checked before the origin is asked (a wrong file is removed,
                # so it is fetched again), then the disk.
                if known:
                    verify(a, self.state, known, a.verify == "always")
                source = SOURCES[a.origin](a)
                preflight(a, source.sizes())
                self.start_origin(lambda: self.fetch_origin(source))
            elif a.origin == "control":
                self.start_origin(None)  # the control node pushes, once this host is ready
        for line in sys.stdin:
            message = json.loads(line)
            what = message.pop("do")
            if what == "manifest":
                self.adopt(message["manifest"], check=True)
            elif what == "fetch":
                threading.Thread(target=self.copy, args=(message["path"], message["peer"]), daemon=True).start()
            elif what == "cancel":
                with self.copy_lock:
                    process = self.copying.pop(message["path"], None)
                    if process:
                        process.kill()  # what arrived stays staged: the next copy appends
            elif what == "recheck":
                threading.Thread(target=self.recheck, daemon=True).start()
            elif what == "origin_done":
                self.origin_running = False
            elif what == "stop":
                print(f"{self.label}: {message['why']}", flush=True)
                break
            elif what == "leave":
                self.status = 0 if self.complete else 1
                break
        else:  # the control node is gone
            self.status = 0 if self.complete else 1
        # The hub CLI and the copies from peers end with this host's part: nothing keeps writing once it
        # has left; no connection to a peer stays open (ssh keeps its control masters apart from the group).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        for address, port in self.peers_used:
            subprocess.run(
                ["ssh", "-o", f"ControlPath={a.connections}", "-p", port, "-O", "exit", f"root@{address}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PEER_CONNECT_TIMEOUT_S,
            )
        return self.status

    def adopt(self, manifest: dict, check: bool) -> None:
        """Take the revision's manifest; with ``check``, verify what is here against it first
        (removing what is wrong) and check the disk has room for the rest."""
        a = self.args
        wrong = [path for path in manifest["files"] if not safe_relative(path)]
        if manifest["revision"] != a.revision or wrong:
            raise Failure(f"refused a manifest of {manifest['revision']} with file names {wrong[:3]}")
        with self.state_lock:
            self.manifest = manifest
            write_json(a.dir / MANIFEST, manifest)
            if check:
                verify(a, self.state, manifest, a.verify == "always")
                preflight(a, {path: entry["size"] for path, entry in manifest["files"].items()})
        self.send("ready", manifest=manifest, verified=self.verified())
        if self.progress is None:
            self.progress = Progress(a.dir, getattr(a, "expected", 0), a.progress_interval, self.label).__enter__()
        self.maybe_complete()

    def start_origin(self, fetch) -> None:
        self.origin_running = True
        print(f"{self.label}: the seed: fetching from the origin and handing on each verified file", flush=True)
        if fetch:
            threading.Thread(target=fetch, daemon=True).start()
        threading.Thread(target=self.watch_origin, daemon=True).start()

    def fetch_origin(self, source: Source) -> None:
        """The hub CLI, as ``sync`` runs it: twice at most, for what is missing or wrong."""
        try:
            for _attempt in (1, 2):
                source.fetch()
                if self.manifest is None:  # modelscope: known only once every file is here
                    self.adopt(source.manifest(), check=False)
                self.sweep()
                if not self.missing():
                    break
        except Failure as failure:
            print(f"{self.label}: {failure}", flush=True)
        self.origin_running = False

    def watch_origin(self) -> None:
        """Hash each file the origin delivers as soon as it is whole, while the origin runs; say
        how it ended. The hub CLIs move a file to its place once it is whole. The control node's
        rsync writes each file in place in the staging directory: its arrival is announced, so
        that peers may take it as it lands (``give`` follows it), and a verified one stays there
        until rsync has ended (rsync still sets its times by name), then moves to its place."""
        a = self.args
        announced = set()
        while True:
            running = self.origin_running
            if self.manifest is None and a.origin != "control":  # the control node sends its own
                known = Given(a).manifest()  # hf writes the hub's tree before the first file
                if known and known["revision"] == a.revision:
                    self.adopt(known, check=False)
            if a.origin == "control" and self.manifest is not None:
                for path in self.missing():
                    if path not in announced and (a.dir / INCOMING / path).is_file():
                        announced.add(path)
                        self.send("arriving", path=path)
            self.sweep(keep_staged=running)
            if not running:
                break
            time.sleep(ARRIVAL_POLL_S if a.origin == "control" else ORIGIN_POLL_S)
        missing = self.missing() if self.manifest else ["the manifest"]
        error = f"{len(missing)} file(s) still missing or wrong: {', '.join(missing[:5])}" if missing else None
        self.send("origin", error=error)

    def missing(self) -> list[str]:
        with self.state_lock:
            return sorted(set(self.manifest["files"]) - set(self.state.data["verified"]))

    def sweep(self, keep_staged: bool = False) -> None:
        """Hash what the origin delivered whole, at its place or staged; with ``keep_staged`` a
        staged file verified stays staged (the origin may still touch it), else it moves."""
        if self.manifest is None:
            return
        with self.sweep_lock:
            for path in self.missing():
                size = self.manifest["files"][path]["size"]
                for target in (self.args.dir / path, self.args.dir / INCOMING / path):
                    if target.is_file() and target.stat().st_size == size:
                        self.check_in(path, target, None, move=not keep_staged)
                        break
            if not keep_staged and self.staged_verified:
                for path in sorted(self.staged_verified):
                    self.place(path, self.args.dir / INCOMING / path)
                self.staged_verified.clear()
                self.maybe_complete()

    def check_in(
        self,
        path: str,
        target: Path,
        peer: str | None,
        move: bool = True,
        received: int | None = None,
        took: float | None = None,
    ) -> bool:
        """Hash a file against the manifest; the wrong one is removed, the right one recorded in
        its place (from the staging directory, where copies land; without ``move`` it stays
        there, verified, and is given from there)."""
        wrong = mismatch(target, self.manifest["files"][path])
        if wrong:
            print(f"{path}{f' from {peer}' if peer else ''}: {wrong} does not match the manifest; removed", flush=True)
            target.unlink()
            return False
        if move:
            self.place(path, target)
        else:
            with self.state_lock:
                self.staged_verified.add(path)
                self.state.data["verified"][path] = stat_of(target)
        # received: the bytes this copy brought (not what an earlier one staged) in ``took``
        # seconds of reading, for its speed.
        self.send("verified", path=path, peer=peer, received=received, took=took)
        self.maybe_complete()
        return True

    def place(self, path: str, target: Path) -> None:
        """A verified file to its place, recorded there."""
        final = self.args.dir / path
        if target != final:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, final)
        with self.state_lock:
            self.state.data["verified"][path] = stat_of(final)
            self.state.save()

    def copy(self, path: str, peer: str) -> None:
        """A copy from a peer, in its own thread: whatever goes wrong is said, so that the control
        node never waits on a copy that is gone."""
        try:
            self.fetch(path, peer)
        except Exception as error:  # noqa: BLE001 (any error: the copy failed here, not the host's part)
            print(f"{path}: the copy from {peer} failed here: {error!r}", flush=True)
            self.send("failed", path=path, peer=peer, bad=False, why=f"{type(error).__name__}: {error}")

    def fetch(self, path: str, peer: str) -> None:
        a = self.args
        size = self.manifest["files"][path]["size"]
        staged = a.dir / INCOMING / path
        staged.parent.mkdir(parents=True, exist_ok=True)
        have = staged.stat().st_size if staged.is_file() else 0
        if have >= size:
            # Whole before an interruption, never moved to its place: hashed, not fetched again.
            if self.check_in(path, staged, None, received=0):
                return
            have = 0
        elif have:
            print(f"{path}: resuming after {human(have)} staged by an earlier copy", flush=True)
        address, port = peer.rsplit(":", 1)
        self.peers_used.add((address, port))
        first = have
        argv = [
            "ssh", "-p", port, "-i", a.peer_key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={a.known_hosts}", "-o", "Compression=no",
            "-o", f"ConnectTimeout={PEER_CONNECT_TIMEOUT_S}", "-o", f"ServerAliveInterval={PEER_ALIVE_INTERVAL_S}",
            "-o", f"ServerAliveCountMax={PEER_ALIVE_COUNT}", "-o", "ControlMaster=auto",
            "-o", f"ControlPath={a.connections}", "-o", f"ControlPersist={PEER_CONNECTION_KEPT_S}",
            f"root@{address}",
            # What the peer's ``give`` reads (its forced command): JSON, no shell on either side.
            json.dumps({"dir": a.peer_path, "path": path, "offset": have}),
        ]  # fmt: skip
        with self.copy_lock:
            self.copying[path] = None
        # ssh's errors go to a file, not a pipe: the ssh that starts a peer's kept connection stays
        # in the background holding its standard error, and a pipe would not end with the copy.
        with self.reading.place() as ticket, tempfile.TemporaryFile() as errors:
            while not self.reading.due(ticket) and path in self.copying:
                time.sleep(NEXT_COPY_POLL_S)
            with self.copy_lock:
                if path not in self.copying:
                    self.send("failed", path=path, peer=peer, bad=False, why="cancelled before it began")
                    return
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
                self.copying[path] = process
            try:
                with self.reading.turn(ticket, size, have):
                    began = time.monotonic()
                    have, failure = receive(process.stdout, staged, have, size, a.transfer_limit, self.reading), None
            except OSError as error:  # this host's disk (full, say)
                process.kill()
                failure = f"writing {staged}: {error.strerror}"
            took = time.monotonic() - began
            with self.copy_lock:
                self.copying.pop(path, None)
            process.stdout.close()  # a peer that sends more than the file's size is not read on
            try:
                process.wait(timeout=PEER_CONNECT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            errors.seek(0)
            error = errors.read().decode(errors="replace")
        if failure or have < size:
            if process.returncode == GIVE_DROPPED:
                staged.unlink(missing_ok=True)  # what came is part of a copy that did not match
            why = failure or (error.strip().splitlines() or [f"ssh exit {process.returncode}"])[-1]
            self.send("failed", path=path, peer=peer, bad=False, why=why)
        elif not self.check_in(path, staged, peer, received=size - first, took=took):
            self.send("failed", path=path, peer=peer, bad=True, why="does not match the manifest")

    def recheck(self) -> None:
        """A peer received a file from here that did not match: hash every file again (a disk
        going bad, a file changed in place without its stat changing); the wrong ones go."""
        lost = []
        with self.sweep_lock:
            for path in self.verified():
                target = self.args.dir / path
                wrong = mismatch(target, self.manifest["files"][path]) if target.is_file() else "file"
                if wrong:
                    print(f"{path}: {wrong} does not match the manifest on a recheck; removed", flush=True)
                    target.unlink(missing_ok=True)
                    lost.append(path)
            with self.state_lock:
                for path in lost:
                    self.state.data["verified"].pop(path, None)
                if lost:
                    self.complete = False
                    self.state.save(complete=False)
        self.send("rechecked", lost=lost)

    def maybe_complete(self) -> None:
        a = self.args
        with self.state_lock:
            if self.complete or self.manifest is None:
                return
            verified = self.state.data["verified"]
            if any(path not in verified or verified[path] != stat_of(a.dir / path) for path in self.manifest["files"]):
                return
            mark_complete(self.state, a, self.manifest)
            self.complete = True
        if self.progress:
            self.progress.__exit__()
        self.send("complete")


RECEIVE_CHUNK = 1 << 20


class Reading:
    """The copies from peers in the order they were asked for: one is read at a time, and the
    next one's session opens once the one read has NEXT_COPY_LEAD_S left at its pace so far."""

    def __init__(self):
        self.condition = threading.Condition()
        self.queue: list[object] = []
        self.size = self.first = self.have = 0  # of the copy read now (size 0: none)
        self.started = 0.0

    @contextlib.contextmanager
    def place(self):
        """A place in the queue, for one copy, until the block ends."""
        ticket = object()
        with self.condition:
            self.queue.append(ticket)
        try:
            yield ticket
        finally:
            self.leave(ticket)

    def leave(self, ticket: object) -> None:
        with self.condition:
            if ticket in self.queue:
                self.queue.remove(ticket)
                self.condition.notify_all()

    def due(self, ticket: object) -> bool:
        """Whether the copy should open its session now: it is first, or next after a copy that
        is about to end."""
        with self.condition:
            if self.queue[0] is ticket:
                return True
            if self.queue[1] is not ticket or not self.size:
                return False
            rate = (self.have - self.first) / max(time.monotonic() - self.started, 1e-3)
            return rate > 0 and (self.size - self.have) / rate <= NEXT_COPY_LEAD_S

    @contextlib.contextmanager
    def turn(self, ticket: object, size: int, have: int):
        """Wait until the copy is first; it is read until the block ends, and then the next one."""
        with self.condition:
            self.condition.wait_for(lambda: self.queue[0] is ticket)
            self.size, self.first, self.have, self.started = size, have, have, time.monotonic()
        try:
            yield
        finally:
            self.size = 0
            self.leave(ticket)


def receive(stream, staged: Path, have: int, size: int, limit: float | None, reading: Reading) -> int:
    """Append what a peer gives to the staged copy, up to the manifest's size and at most
    ``limit`` bytes a second, telling ``reading`` how far it is; returns how much is staged
    (less than ``size``: the stream ended)."""
    started, first = time.monotonic(), have
    # O_NOFOLLOW: the staging directory is root's (safe_directory), its last component too.
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        while have < size:
            chunk = os.read(stream.fileno(), min(RECEIVE_CHUNK, size - have))
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            have += len(chunk)
            reading.have = have
            if limit:
                ahead = (have - first) / limit - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        os.close(fd)
    return have


# --- giving a file to a peer (the transfer key's forced command) --------------------------------


class Refused(Exception):
    """A request ``give`` does not serve; the message goes to the peer."""


def open_below(root_fd: int, relative: str) -> int:
    """Open the regular file ``relative`` below an open directory for reading, no component a
    link, none "." or "..": a link planted in the store is never followed, by root, out of it
    (nor a FIFO waited on)."""
    parts = relative.split("/")
    if not relative or any(part in ("", ".", "..") for part in parts):
        raise Refused(f"not a plain relative path: {relative!r}")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        found = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(found).st_mode):
        os.close(found)
        raise Refused(f"{relative} is not a regular file")
    return found


def same_file(root_fd: int, relative: str, fd: int) -> bool:
    """Whether ``relative`` (below the store) is still the open file ``fd``."""
    try:
        found = open_below(root_fd, relative)
    except (OSError, Refused):
        return False
    try:
        a, b = os.fstat(found), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    finally:
        os.close(found)


def give(store: str, request: str, out: int) -> int:
    """Write one file of a model directory in ``store`` to ``out``, from an offset, for a peer.

    Only a file the directory's manifest names, at its place or staged in the directory's
    incoming copies while this host still receives it: then what arrives is handed on as it
    lands, and the wait for more bytes ends when the file is whole, removed (it did not match:
    GIVE_DROPPED) or still for GIVE_STALL_S. Each receiver hashes its whole copy against the
    manifest, so a byte handed on early is never trusted early."""
    try:
        asked = json.loads(request)
        directory, path, offset = asked["dir"], asked["path"], asked["offset"]
        if not (isinstance(directory, str) and isinstance(path, str) and type(offset) is int and offset >= 0):
            raise Refused("wants dir and path (strings) and offset (a number >= 0)")
    except (ValueError, KeyError, TypeError, Refused) as error:
        raise Refused(f"not a request: {error}") from None
    if any(part.startswith(".") for part in directory.split("/")) or not safe_relative(path):
        raise Refused(f"not a model file: {directory!r} {path!r}")
    root_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            manifest_fd = open_below(root_fd, f"{directory}/{MANIFEST}")
        except FileNotFoundError:
            raise Refused(f"no manifest in {directory}") from None
        with os.fdopen(manifest_fd) as manifest_file:
            entry = json.load(manifest_file)["files"].get(path)
        if entry is None or offset > entry["size"]:
            raise Refused(f"{path} (offset {offset}) is not in the manifest of {directory}")
        # The scheduler may ask for a copy this host has only just been told to fetch.
        places, asked_at = [f"{directory}/{path}", f"{directory}/{INCOMING}/{path}"], time.monotonic()
        while (fd := first_found(root_fd, places)) is None:
            if time.monotonic() - asked_at > GIVE_STALL_S:
                raise Refused(f"{path} is not here")
            time.sleep(GIVE_POLL_S)
        with os.fdopen(fd, "rb", buffering=0) as source:
            return stream(source, entry["size"], offset, out, lambda: any(same_file(root_fd, p, fd) for p in places))
    finally:
        os.close(root_fd)


def first_found(root_fd: int, places: list[str]) -> int | None:
    for place in places:
        try:
            return open_below(root_fd, place)
        except FileNotFoundError:
            continue
    return None


def stream(source, size: int, offset: int, out: int, live: Callable[[], bool]) -> int:
    """Copy ``source`` from ``offset`` to ``size`` onto ``out``, waiting for bytes not yet written
    while ``live()`` says the file is still the one being received."""
    source.seek(offset)
    position, still_since = offset, time.monotonic()
    while position < size:
        chunk = source.read(min(RECEIVE_CHUNK, size - position))
        if chunk:
            still_since = time.monotonic()
            view = memoryview(chunk)
            while view:  # ``out`` does not block: a receiver gone silent is noticed here
                if not select.select([], [out], [], PEER_IO_TIMEOUT_S)[1]:
                    print(f"the receiver took nothing for {PEER_IO_TIMEOUT_S} s", file=sys.stderr)
                    return GIVE_STALLED
                try:
                    view = view[os.write(out, view) :]
                except BlockingIOError:
                    continue
            position += len(chunk)
        elif not live():
            print("this host's copy did not match the manifest and was removed", file=sys.stderr)
            return GIVE_DROPPED
        elif time.monotonic() - still_since > GIVE_STALL_S:
            print(f"no new bytes here for {GIVE_STALL_S} s", file=sys.stderr)
            return GIVE_STALLED
        else:
            time.sleep(GIVE_POLL_S)
    return 0


def report_state(args) -> dict:
    state_path = Path(args.state)
    data = json.loads(state_path.read_text()) if state_path.exists() else {}
    return completion(data, args.key, lambda path: stat_of(Path(args.dir) / path))


def main(argv: list[str] | None = None) -> int:
    os.umask(0o022)
    parser = argparse.ArgumentParser(prog="glmfleet-weights", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--dir", required=True, help="the model directory")
        p.add_argument("--state", required=True, help="host-local state file")
        p.add_argument("--key", required=True, help="identity of the configured model, revision and file selection")

    common(commands.add_parser("check", help="exit 0 only where the revision is complete (before vLLM starts)"))
    common(p_sync := commands.add_parser("sync", help="fetch, verify, mark complete"))
    p_sync.add_argument("--model", required=True)
    p_sync.add_argument("--revision", required=True)
    p_sync.add_argument("--source", choices=sorted(SOURCES), required=True)
    p_sync.add_argument(
        "--phase",
        choices=("receive", "prepare", "finish", "all"),
        default="all",
        help="receive: make DIR/.glmfleet for a pushed manifest; prepare: verify what is there and check "
        "the disk; finish: verify and mark; all: prepare, fetch, finish",
    )
    p_sync.add_argument("--include", action="append", default=[])
    p_sync.add_argument("--exclude", action="append", default=[])
    p_sync.add_argument("--cli", help="the hf or modelscope executable")
    p_sync.add_argument("--cli-home", default="/var/cache/glmfleet/hub", help="the CLI's own cache and settings")
    p_sync.add_argument(
        "--env-file", help="a JSON object of the CLI's environment (endpoint, token): never on a command line"
    )
    p_sync.add_argument("--margin-bytes", type=int, default=0)
    p_sync.add_argument("--verify", choices=("changed", "always"), default="changed")
    p_sync.add_argument("--progress-interval", type=float, default=10)
    common(p_swarm := commands.add_parser("swarm", help="this host's part in a fan-out, driven by the control node"))
    p_swarm.set_defaults(source="peer")
    p_swarm.add_argument("--model", required=True)
    p_swarm.add_argument("--revision", required=True)
    p_swarm.add_argument(
        "--origin",
        choices=("hf", "modelscope", "control"),
        help="this host is the seed: it fetches from the origin (control: the control node pushes)",
    )
    p_swarm.add_argument("--include", action="append", default=[])
    p_swarm.add_argument("--exclude", action="append", default=[])
    p_swarm.add_argument("--cli", help="the hf or modelscope executable (the seed)")
    p_swarm.add_argument("--cli-home", default="/var/cache/glmfleet/hub", help="the CLI's own cache and settings")
    p_swarm.add_argument("--env-file", help="a JSON object of the CLI's environment (endpoint, token)")
    p_swarm.add_argument("--peer-path", required=True, help="the model directory below the peers' model store")
    p_swarm.add_argument("--peer-key", required=True, help="the fleet's transfer key")
    p_swarm.add_argument("--known-hosts", required=True, help="the peers' host keys")
    p_swarm.add_argument("--connections", required=True, help="ssh's ControlPath for the connections to peers")
    p_swarm.add_argument("--transfer-limit", type=float, help="bytes per second at most for each copy from a peer")
    p_swarm.add_argument("--margin-bytes", type=int, default=0)
    p_swarm.add_argument("--verify", choices=("changed", "always"), default="changed")
    p_swarm.add_argument("--progress-interval", type=float, default=10)
    p_give = commands.add_parser(
        "give", help="the transfer key's forced command: one model file for a peer, asked in $SSH_ORIGINAL_COMMAND"
    )
    p_give.add_argument("--store", required=True, help="the model store: only its model directories' files are given")
    p_manifest = commands.add_parser(
        "manifest", help="write DIR/.glmfleet/manifest.json (hub tree if hf left one, else sha256 of each file)"
    )
    p_manifest.add_argument("dir")
    p_manifest.add_argument("--model", required=True)
    p_manifest.add_argument("--revision", required=True)
    p_manifest.add_argument("--include", action="append", default=[])
    p_manifest.add_argument("--exclude", action="append", default=[])
    p_manifest.add_argument("--output", help="where to write it (default: in DIR)")
    args = parser.parse_args(argv)

    try:
        if args.command == "check":
            found = report_state(args)
            if not found["complete"]:
                print(
                    f"model weights in {args.dir} are not complete ({found['reason']}"
                    + (f": {', '.join(found['changed'][:5])}" if found["changed"] else "")
                    + "); re-run the deploy",
                    file=sys.stderr,
                )
                return 1
        elif args.command == "sync":
            sync(args)
        elif args.command == "swarm":
            return Agent(args).run()
        elif args.command == "give":
            os.set_blocking(sys.stdout.fileno(), False)
            try:
                return give(args.store, os.environ.get("SSH_ORIGINAL_COMMAND", ""), sys.stdout.fileno())
            except (Refused, OSError) as error:
                print(f"glmfleet-weights give: {error}", file=sys.stderr, flush=True)
                return GIVE_REFUSED
        elif args.command == "manifest":
            directory = Path(args.dir)
            manifest = manifest_from_hub_tree(
                directory, args.model, args.revision, args.include, args.exclude
            ) or computed_manifest(directory, args.model, args.revision, args.include, args.exclude)
            write_json(Path(args.output) if args.output else directory / MANIFEST, manifest)
            print(
                json.dumps(
                    {
                        "files": len(manifest["files"]),
                        "bytes": sum(e["size"] for e in manifest["files"].values()),
                        "origin": manifest["origin"],
                    }
                )
            )
    except Failure as failure:
        print(f"glmfleet-weights: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local test fleet: Debian 12 hosts booted with systemd inside systemd-nspawn.

Each host's root is an overlay of one cached, read-only base root filesystem and a directory of
the host's own, runs systemd as PID 1 and an sshd that listens on its own port on 127.0.0.1
(the hosts share the machine's network namespace), so pyinfra and the tests reach it over real
SSH. A supervisor process per host mounts the overlay in a mount namespace of its own (so no
mount outlives it) and boots the container again when its systemd reboots, as a real machine
would.

    python -m devfleet.localfleet up [--hosts N]    # idempotent
    python -m devfleet.localfleet status
    python -m devfleet.localfleet down [--destroy]

Made for machines whose PID 1 is not systemd (our development VMs and CI); needs root and
`make fleet-deps`. Only the standard library is used: this runs before the project's venv exists.

Several fleets can run side by side on one machine: GLMFLEET_FLEET_SLOT=N (0-9, default 0)
gives slot N its own state dir, host names (fleetN-01) and port ranges (N*100 above slot 0's).

State lives in GLMFLEET_FLEET_DIR (default /var/lib/glmfleet-localfleet, -slotN for slot N):

    base-<hash>/            root filesystem built by mmdebstrap, cached by its build arguments;
                            never changed once built (hosts' overlays sit on it)
    base-<hash>.log         mmdebstrap's output
    id_ed25519[.pub]        the SSH key that logs in as root on every host
    known_hosts             each host's own ed25519 host key, for strict host key checking
    hosts.json              [{"name", "ssh_port", "vllm_port", "ssh_key", "known_hosts", "base",
                              "upper", "console_log"}, ...] for every host created, up or not
    hosts/<name>/upper/     every file the host has written: its root is base + upper
    hosts/<name>/work/      overlayfs's work directory
    hosts/<name>/root/      where the supervisor mounts the root (seen only in its namespace:
                            `nsenter --mount --target $(cat supervisor.pid) ls .../root`)
    hosts/<name>/console.log
    hosts/<name>/supervisor.pid
"""

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

DEFAULT_FLEET_DIR = "/var/lib/glmfleet-localfleet"
FIRST_SSH_PORT = 2201
# The hosts share the machine's network: vLLM's default port 8000 would collide between them.
FIRST_VLLM_PORT = 8001
MAX_HOSTS = 99  # host names have two digits

DEBIAN_COMPONENTS = "main contrib non-free non-free-firmware"  # the NVIDIA role needs non-free
MMDEBSTRAP_ARGS = [
    "--variant=minbase",
    "--include=systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,iproute2,sudo,ca-certificates,curl",
    "bookworm",
]
# Given explicitly: without a mirror argument mmdebstrap reads sources from a non-tty stdin.
APT_SOURCES = [
    f"deb http://deb.debian.org/debian bookworm {DEBIAN_COMPONENTS}",
    f"deb http://deb.debian.org/debian bookworm-updates {DEBIAN_COMPONENTS}",
    f"deb http://deb.debian.org/debian-security bookworm-security {DEBIAN_COMPONENTS}",
]
# Masked in the base. apt's timers would take the dpkg lock at random times (racing deploys)
# and hit the archive on every boot of every host; the rest have no disk to work on here.
MASKED_UNITS = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
]
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
REQUIRED_TOOLS = ["mmdebstrap", "systemd-nspawn", "unshare", "mount", "ssh", "ssh-keygen"]

# systemd-nspawn exits with this status when the container's systemd reboots (systemd-nspawn(1)).
CONTAINER_REBOOTED = 133
# All hosts' processes run as the machine's root and share its inotify instances: 7 a host
# (systemd, journald, logind, dbus), against a default limit of 128 for everything root runs.
# Measured: with 16 hosts and two other slots' fleets up, hosts failed to boot with "Failed to
# create inotify object: Too many open files". 1024 leaves room for about 140 hosts.
INOTIFY_INSTANCES = 1024
READY_TIMEOUT_S = 180  # measured: 16 hosts created and booted at once on 2 cores in 21 s
STOP_TIMEOUT_S = 60


class FleetError(Exception):
    """A fleet operation failed; the message says which host and where to look."""


class BootStopped(FleetError):
    """A host's container exited before it finished booting."""


def fleet_slot() -> int:
    slot = os.environ.get("GLMFLEET_FLEET_SLOT", "0")
    if slot not in [str(n) for n in range(10)]:
        raise FleetError(f"GLMFLEET_FLEET_SLOT must be a digit 0-9, not {slot!r}")
    return int(slot)


def fleet_dir() -> Path:
    default = DEFAULT_FLEET_DIR + (f"-slot{fleet_slot()}" if fleet_slot() else "")
    return Path(os.environ.get("GLMFLEET_FLEET_DIR", default))


def host_name(index: int) -> str:
    slot = fleet_slot()
    return f"fleet{slot}-{index:02d}" if slot else f"fleet-{index:02d}"


# --- the Python API -------------------------------------------------------------------------


def load_hosts() -> list[dict]:
    """The hosts that are up (powered on: booted, booting or rebooting), as in hosts.json."""
    return [host for host in _read_hosts() if is_up(host)]


def up(count: int = 2) -> list[dict]:
    """Makes fleet-01..fleet-<count> up and ready, leaving hosts already up as they are;
    returns every host that is up."""
    if not 1 <= count <= MAX_HOSTS:
        raise FleetError(f"--hosts must be between 1 and {MAX_HOSTS}, not {count}")
    _check_machine()
    with _fleet_lock():
        base = _ensure_base()
        known = _read_hosts()
        # Hosts made on an older base (other packages, CAs, or full copies before overlays)
        # would differ from new ones: while none of them runs, make them anew.
        if any(Path(host.get("base", "")).name != base.name for host in known) and not any(map(is_up, known)):
            print(f"localfleet: recreating the hosts in {fleet_dir()} on the current base", flush=True)
            _down(destroy=True)
        _ensure_ssh_key()
        hosts = {host["name"]: host for host in _read_hosts()}
        wanted = [host_name(index) for index in range(1, count + 1)]
        for index, name in enumerate(wanted, start=1):
            if name not in hosts:
                hosts[name] = _create_host(base, name, index)
                _write_hosts(list(hosts.values()))
        for name in wanted:
            if not is_up(hosts[name]):
                _start_supervisor(hosts[name])
        _wait_all_ready([hosts[name] for name in wanted])
    return load_hosts()


def down(destroy: bool = False) -> None:
    """Power off every host; with destroy, also delete what they wrote (the base stays)."""
    with _fleet_lock():
        _down(destroy)


def _down(destroy: bool) -> None:
    hosts = _read_hosts()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        list(pool.map(_stop, hosts))
    if destroy:
        shutil.rmtree(fleet_dir() / "hosts", ignore_errors=True)
        _write_hosts([])


def stop_host(name: str, force: bool = False) -> None:
    """Power one host off: orderly (systemd shuts down), or with force like pulling the plug."""
    with _fleet_lock():
        _stop(_host(name), force=force)


def start_host(name: str) -> None:
    """Boot one host that was created before and wait until it is ready."""
    with _fleet_lock():
        host = _host(name)
        if not is_up(host):
            _start_supervisor(host)
        try:
            _wait_all_ready([host])
        except BootStopped as first:
            # Seen rarely right after a forced power-off on a loaded machine (cause not yet caught):
            # power it on once more, and say so with what the console showed.
            print(f"localfleet: {first}; booting it once more", file=sys.stderr, flush=True)
            _start_supervisor(host)
            _wait_all_ready([host])


def inventory_hosts() -> list[tuple[str, dict]]:
    """(name, pyinfra host data) for every host that is up: what inventory/local.py lists."""
    return [
        (
            host["name"],
            {
                "ssh_hostname": "127.0.0.1",
                "ssh_port": host["ssh_port"],
                "ssh_user": "root",
                "ssh_key": host["ssh_key"],
                # Each host's key is known from its creation: check it strictly.
                "ssh_known_hosts_file": host["known_hosts"],
                "ssh_strict_host_key_checking": "yes",
                "vllm_port": host["vllm_port"],
            },
        )
        for host in load_hosts()
    ]


def is_up(host: dict) -> bool:
    return _supervisor_pid(host) is not None


def wait_ready(host: dict, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Waits until sshd answers and systemd has finished booting; returns systemd's state
    ("running", or "degraded" if a unit failed)."""
    deadline = time.monotonic() + timeout_s
    last_answer = "no answer yet"
    while True:
        if not is_up(host):
            console = Path(host["console_log"]).read_text(errors="replace").splitlines()[-15:]
            raise BootStopped(
                f"{host['name']} stopped while booting; console log {host['console_log']} ends:\n" + "\n".join(console)
            )
        try:
            result = subprocess.run(
                [*ssh_argv(host), "systemctl", "is-system-running", "--wait"],
                capture_output=True,
                text=True,
                timeout=max(1, deadline - time.monotonic()),
            )
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            last_answer = state or result.stderr.strip() or f"ssh exit {result.returncode}"
        except subprocess.TimeoutExpired:
            last_answer = "systemctl is-system-running --wait did not return"
        if time.monotonic() > deadline:
            raise FleetError(
                f"{host['name']} was not ready within {timeout_s} s ({last_answer}); console log: {host['console_log']}"
            )
        time.sleep(0.5)


def ssh_argv(host: dict) -> list[str]:
    """The ssh command line (without the remote command) that logs in to host as root."""
    return [
        "ssh",
        "-F",
        "/dev/null",  # the user's ssh config must not change how we reach test hosts
        "-i",
        host["ssh_key"],
        "-p",
        str(host["ssh_port"]),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        f"UserKnownHostsFile={host['known_hosts']}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "LogLevel=ERROR",
        "root@127.0.0.1",
    ]


# --- state files ----------------------------------------------------------------------------


def _hosts_file() -> Path:
    return fleet_dir() / "hosts.json"


def _read_hosts() -> list[dict]:
    try:
        return json.loads(_hosts_file().read_text())
    except FileNotFoundError:
        return []


def _write_hosts(hosts: list[dict]) -> None:
    hosts = sorted(hosts, key=lambda host: host["name"])
    temporary = _hosts_file().with_suffix(".tmp")
    temporary.write_text(json.dumps(hosts, indent=2) + "\n")
    temporary.replace(_hosts_file())
    # Rewritten with hosts.json so a re-created host's new key replaces the old one.
    known_hosts = "".join(f"[127.0.0.1]:{host['ssh_port']} {_host_public_key(host)}\n" for host in hosts)
    (fleet_dir() / "known_hosts").write_text(known_hosts)


def _host(name: str) -> dict:
    for host in _read_hosts():
        if host["name"] == name:
            return host
    raise FleetError(f"no host {name} in {_hosts_file()}: run `up` first")


@contextlib.contextmanager
def _fleet_lock():
    """Serialises up/down/start/stop between processes (tests and make can overlap)."""
    fleet_dir().mkdir(parents=True, exist_ok=True)
    with open(fleet_dir() / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- building the base and the hosts --------------------------------------------------------


def _check_machine() -> None:
    if os.geteuid() != 0:
        raise FleetError("the local fleet needs root (mmdebstrap and systemd-nspawn)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise FleetError(f"missing {', '.join(missing)}: run `make fleet-deps`")
    inotify_limit = Path("/proc/sys/fs/inotify/max_user_instances")
    if int(inotify_limit.read_text()) < INOTIFY_INSTANCES:
        inotify_limit.write_text(f"{INOTIFY_INSTANCES}\n")


def _extra_ca_hooks() -> tuple[list[str], str]:
    """mmdebstrap hooks that make hosts trust this machine's own CAs (a site proxy's, say), so
    they reach the registries the machine reaches; and the CAs' contents, for the cache key."""
    cas = sorted(EXTRA_CA_DIR.glob("*.crt"))
    if not cas:
        return [], ""
    hooks = [
        f"--customize-hook=copy-in {' '.join(map(str, cas))} {EXTRA_CA_DIR}",
        '--customize-hook=chroot "$1" update-ca-certificates',
    ]
    return hooks, "".join(ca.read_text() for ca in cas)


def _ensure_base() -> Path:
    """The base root filesystem; built once per set of build arguments, then reused."""
    ca_hooks, ca_contents = _extra_ca_hooks()
    build_args = [*ca_hooks, *MMDEBSTRAP_ARGS, *APT_SOURCES, *MASKED_UNITS]
    digest = hashlib.sha256((json.dumps(build_args) + ca_contents).encode()).hexdigest()[:12]
    base = fleet_dir() / f"base-{digest}"
    if not base.is_dir():
        _build_base(base, ca_hooks)
    _remove_unused_bases(keep=base)
    return base


def _build_base(base: Path, ca_hooks: list[str]) -> None:
    log = base.with_suffix(".log")
    partial = base.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"localfleet: building the base root filesystem in {base} (log: {log})", flush=True)
    with open(log, "w") as log_file:
        result = subprocess.run(
            ["mmdebstrap", *ca_hooks, *MMDEBSTRAP_ARGS, str(partial), *APT_SOURCES],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise FleetError(f"mmdebstrap failed (exit {result.returncode}); see {log}")
    # Each host makes its own host key: the overlay cannot hide these without whiteouts.
    for shared_key in (partial / "etc" / "ssh").glob("ssh_host_*"):
        shared_key.unlink()
    for unit in MASKED_UNITS:
        (partial / "etc" / "systemd" / "system" / unit).symlink_to("/dev/null")
    partial.rename(base)


def _remove_unused_bases(keep: Path) -> None:
    """Bases built from other arguments, once no host's overlay sits on them any more."""
    in_use = {keep.name} | {Path(host["base"]).name for host in _read_hosts()}
    for base in fleet_dir().glob("base-*"):
        if base.is_dir() and base.name not in in_use:
            shutil.rmtree(base)
            base.with_suffix(".log").unlink(missing_ok=True)


def _ssh_key() -> Path:
    return fleet_dir() / "id_ed25519"


def _ensure_ssh_key() -> None:
    if not _ssh_key().exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "glmfleet-localfleet", "-f", str(_ssh_key())],
            check=True,
        )
    _ssh_key().chmod(0o600)


def _create_host(base: Path, name: str, index: int) -> dict:
    """A new host: an empty upper layer over the base, holding what makes it a distinct machine.
    An overlay rather than a copy of the base: on our 2-core VM, 16 copies took 21-66 s to
    create and 35 s to delete (4.6 GB), against milliseconds; base files share page cache."""
    ssh_port = FIRST_SSH_PORT + 100 * fleet_slot() + index - 1
    host_dir = fleet_dir() / "hosts" / name
    shutil.rmtree(host_dir, ignore_errors=True)
    for layer in ("upper", "work", "root"):
        (host_dir / layer).mkdir(parents=True)
    _write_host_identity(base, host_dir / "upper", name, ssh_port)
    return {
        "name": name,
        "ssh_port": ssh_port,
        "vllm_port": FIRST_VLLM_PORT + 100 * fleet_slot() + index - 1,
        "ssh_key": str(_ssh_key()),
        "known_hosts": str(fleet_dir() / "known_hosts"),
        "base": str(base),
        "upper": str(host_dir / "upper"),
        "console_log": str(host_dir / "console.log"),
    }


def _write_host_identity(base: Path, upper: Path, name: str, ssh_port: int) -> None:
    """Written straight into the (unmounted) upper layer, which overlayfs allows."""
    etc = _upper_dir(base, upper, "etc")
    (etc / "hostname").write_text(f"{name}\n")
    # sudo resolves the host's own name.
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n")
    # A machine id of its own: without one systemd would treat every boot as the first.
    (etc / "machine-id").write_text(f"{uuid.uuid4().hex}\n")

    ssh_etc = _upper_dir(base, upper, "etc/ssh")
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            f"root@{name}",
            "-f",
            str(ssh_etc / "ssh_host_ed25519_key"),
        ],
        check=True,
    )
    (_upper_dir(base, upper, "etc/ssh/sshd_config.d") / "glmfleet-localfleet.conf").write_text(
        f"Port {ssh_port}\n"
        "ListenAddress 127.0.0.1\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
    )
    authorized_keys = _upper_dir(base, upper, "root/.ssh") / "authorized_keys"
    shutil.copyfile(f"{_ssh_key()}.pub", authorized_keys)
    authorized_keys.chmod(0o600)


def _upper_dir(base: Path, upper: Path, relative: str) -> Path:
    """Makes relative/ in the upper layer. A directory in the upper layer lends the merged view
    its permissions, so each takes those of the base's directory (0700 where it has none)."""
    path = Path()
    for part in Path(relative).parts:
        path /= part
        if not (upper / path).is_dir():
            (upper / path).mkdir()
            if (base / path).is_dir():
                shutil.copystat(base / path, upper / path)
            else:
                (upper / path).chmod(0o700)
    return upper / relative


def _host_public_key(host: dict) -> str:
    key_file = Path(host["upper"]) / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
    key_type, key, _comment = key_file.read_text().split()
    return f"{key_type} {key}"


# --- booting, readiness, stopping -----------------------------------------------------------


def _pid_file(host: dict) -> Path:
    return Path(host["console_log"]).with_name("supervisor.pid")


def _work_dir(host: dict) -> Path:
    return Path(host["upper"]).with_name("work")


def _root_mount_point(host: dict) -> Path:
    return Path(host["upper"]).with_name("root")


def _supervisor_argv(name: str) -> list[str]:
    return [sys.executable, "-m", "devfleet.localfleet", "supervise", name]


def _supervisor_pid(host: dict) -> int | None:
    """The pid of the host's supervisor if it runs; a recycled pid does not count, nor a
    supervisor that has exited and not been reaped yet (a zombie)."""
    try:
        pid = int(_pid_file(host).read_text())
        proc = Path(f"/proc/{pid}")
        argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        if not argv:
            # In the middle of an execve (unshare exec'ing the supervisor) the kernel shows no
            # argv for an instant: a user process (it has an executable) that is not a zombie is
            # still the supervisor. Read as "gone", this stopped a host "while booting" with an
            # empty console log, about once in 450 tests (issue 18).
            os.readlink(proc / "exe")
    except (OSError, ValueError, IndexError):
        return None
    if state == "Z":
        return None
    # The same ending before unshare has exec'd the supervisor (measured under load) and after.
    expected_ending = [os.fsencode(arg) for arg in _supervisor_argv(host["name"])[1:]]
    return pid if not argv or argv[-len(expected_ending) :] == expected_ending else None


def _start_supervisor(host: dict) -> None:
    if _port_in_use(host["ssh_port"]):
        raise FleetError(f"{host['name']}: port 127.0.0.1:{host['ssh_port']} is taken by another process")
    package_parent = str(Path(__file__).resolve().parent.parent)
    with open(host["console_log"], "w") as console:
        supervisor = subprocess.Popen(
            # Its own mount namespace: the root's overlay mount ends with it, whatever happens.
            ["unshare", "--mount", "--propagation=private", *_supervisor_argv(host["name"])],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,  # outlives the caller, and its terminal's signals
            env={**os.environ, "PYTHONPATH": package_parent},
        )
    _pid_file(host).write_text(f"{supervisor.pid}\n")


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_all_ready(hosts: list[dict]) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(wait_ready, hosts))


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _stop(host: dict, force: bool = False) -> None:
    """Orderly: SIGTERM makes the supervisor ask the container's systemd to power off. Force,
    or an orderly stop past its deadline: SIGKILL to the container's init ends its whole PID
    namespace at once, and the supervisor exits because that is not a reboot."""
    supervisor = _supervisor_pid(host)
    if supervisor is None:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not force and time.monotonic() < deadline:
        # Repeated: early in a boot systemd has no signal handlers yet and ignores the request
        # (measured: a stop 0.3 s after a reboot waited for the whole deadline).
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        if _wait_exit(host, 2):
            return
    for nspawn in _children(supervisor):
        for container_init in _children(nspawn):
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.kill(container_init, signal.SIGKILL)
    # Between two boots of a reboot there is no container: the supervisor must not boot one.
    with contextlib.suppress(ProcessLookupError):
        os.kill(supervisor, signal.SIGTERM)
    if not _wait_exit(host, STOP_TIMEOUT_S):
        raise FleetError(
            f"{host['name']} did not stop (supervisor pid {supervisor}); console log: {host['console_log']}"
        )


def _wait_exit(host: dict, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _supervisor_pid(host) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# --- the per-host supervisor (runs in its own session, output to the console log) -----------


def _supervise(name: str) -> int:
    host = _host(name)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={host['base']},upperdir={host['upper']},workdir={_work_dir(host)}",
            str(_root_mount_point(host)),
        ],
        check=True,
    )
    cgroups = _enter_own_cgroups(name)
    stopping = False
    nspawn = None

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True
        if nspawn is not None:
            _request_poweroff(nspawn.pid)

    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            nspawn = subprocess.Popen(_boot_argv(host))
            status = nspawn.wait()
            if status != CONTAINER_REBOOTED:
                return status
            print(f"localfleet: {name} rebooted; booting it again", flush=True)
        return 0
    finally:
        _leave_cgroups(cgroups)


def _request_poweroff(nspawn_pid: int) -> None:
    """What `systemctl poweroff` inside does: systemd powers off on SIGRTMIN+4 (systemd(1))."""
    for container_init in _children(nspawn_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(container_init, signal.SIGRTMIN + 4)


def _boot_argv(host: dict) -> list[str]:
    """systemd-nspawn in a time namespace whose clocks start at this boot: /proc/uptime is
    otherwise the machine's, and pyinfra's server.reboot, which waits for the uptime to drop,
    would never see the host come back (measured). Offsets are whole seconds (unshare), so the
    clocks start less than a second after zero."""
    monotonic_offset = -int(time.clock_gettime(time.CLOCK_MONOTONIC))
    boottime_offset = -int(time.clock_gettime(time.CLOCK_BOOTTIME))
    return [
        "unshare",
        "--time",
        f"--monotonic={monotonic_offset}",
        f"--boottime={boottime_offset}",
        *_nspawn_argv(host),
    ]


def _nspawn_argv(host: dict) -> list[str]:
    # Its exit message "Attempted to remove disk file system under /run/systemd/nspawn/
    # propagate/..." is harmless: /run is not a tmpfs on our machines; the directory goes.
    return [
        "systemd-nspawn",
        "--boot",
        f"--directory={_root_mount_point(host)}",
        f"--machine={host['name']}",
        # No systemd on the machine to register with or to create a scope (facts.md).
        "--register=no",
        "--keep-unit",
        "--console=read-only",
    ]


def _cgroup_mounts() -> dict[str, str]:
    """Mount points of the hierarchies systemd uses, keyed as in /proc/self/cgroup."""
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _device, mount_point, fs_type, options, *_ = line.split()
        if fs_type == "cgroup2":
            mounts[""] = mount_point
        elif fs_type == "cgroup" and "name=systemd" in options.split(","):
            mounts["name=systemd"] = mount_point
    return mounts


def _enter_own_cgroups(name: str) -> list[Path]:
    """With --keep-unit every nspawn uses its caller's cgroup: all hosts' systemd would then
    manage one shared tree (measured: every host's sshd sat in one ssh.service cgroup).
    A cgroup per host, below ours, keeps them apart."""
    mounts = _cgroup_mounts()
    entered = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, hierarchy, path = line.split(":", 2)
        if hierarchy not in mounts:
            continue
        own = Path(mounts[hierarchy] + path.rstrip("/")) / f"glmfleet-{name}"
        own.mkdir(exist_ok=True)
        (own / "cgroup.procs").write_text(str(os.getpid()))
        entered.append(own)
    return entered


def host_cpu_seconds(name: str) -> float | None:
    """CPU time everything in a running host has used (its cgroup v2 ``cpu.stat``), None where
    the host has no cgroup v2 of its own. The hosts share this machine's cores, so a benchmark
    reads what the deploy cost the hosts apart from what it cost the controller."""
    root = _cgroup_mounts().get("")
    if root is None:
        return None
    own = next(Path(root).rglob(f"glmfleet-{name}"), None)  # below the cgroup that started the fleet
    if own is None:
        return None
    for line in (own / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    return None


def _leave_cgroups(cgroups: list[Path]) -> None:
    for own in cgroups:
        (own.parent / "cgroup.procs").write_text(str(os.getpid()))
        for directory, _subdirectories, _files in os.walk(own, topdown=False):
            with contextlib.suppress(OSError):  # cgroup files go with their directory
                os.rmdir(directory)


# --- command line ---------------------------------------------------------------------------


def _print_status() -> None:
    hosts = _read_hosts()
    if not hosts:
        print(f"no hosts in {fleet_dir()}")
    for host in hosts:
        state = "up" if is_up(host) else "down"
        print(
            f"{host['name']}  {state:4}  ssh 127.0.0.1:{host['ssh_port']}  "
            f"vllm 127.0.0.1:{host['vllm_port']}  {Path(host['upper']).parent}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devfleet.localfleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="create and boot hosts, wait until ready")
    up_parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    down_parser = commands.add_parser("down", help="power off every host")
    down_parser.add_argument(
        "--destroy", action="store_true", help="also delete the hosts' root filesystems (the base stays)"
    )
    commands.add_parser("status", help="list hosts")
    supervise_parser = commands.add_parser("supervise")  # internal: started by up
    supervise_parser.add_argument("name")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            up(args.hosts)
            _print_status()
        elif args.command == "down":
            down(destroy=args.destroy)
        elif args.command == "status":
            _print_status()
        else:
            return _supervise(args.name)
    except FleetError as error:
        print(f"localfleet: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

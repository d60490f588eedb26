"""The local test fleet: Debian 12 hosts booted with systemd inside systemd-nspawn.

Each host's root is an overlay of one cached, read-only base root filesystem and a directory of
the host's own, runs systemd as PID 1 and an sshd, so pyinfra and the tests reach it over real
SSH. Two kinds of host, by network:

- shared (the default): the host shares the machine's network namespace; its sshd listens on a
  port of its own on 127.0.0.1 (fleetN-01, fleetN-02, ...).
- linked (``up --links``): the host has a network namespace of its own, joined to a bridge the
  fleet makes (``glmfleetN``, 10.77.N.0/24, the machine itself at .254) by a veth pair; it listens
  on the ports production hosts use (sshd on 22, vLLM on 8000) at its own address, and its link
  can be shaped with tc (``shape``: rate with tbf both ways, delay and loss with netem where the
  kernel has it) or cut (``link NAME down``). Its network reaches only the fleet's hosts and the
  machine (fleetN-n01, fleetN-n02, ...). A supervisor process per host mounts the overlay in a mount namespace of its own (so no
mount outlives it) and boots the container again when its systemd reboots, as a real machine
would.

    python -m devfleet.localfleet up [--hosts N] [--links]    # idempotent
    python -m devfleet.localfleet shape NAME|all [--rate MBIT] [--delay MS] [--loss PCT]
    python -m devfleet.localfleet link NAME up|down
    python -m devfleet.localfleet status
    python -m devfleet.localfleet down [--destroy]

Made for machines whose PID 1 is not systemd (our development VMs and CI); needs root and
`make fleet-deps`. Only the standard library is used: this runs before the project's venv exists.

Several fleets can run side by side on one machine: GLMFLEET_FLEET_SLOT=N (0-9, default 0)
gives slot N its own state dir, host names (fleetN-01), port ranges (N*100 above slot 0's) and
linked hosts' network (10.77.N.0/24).

State lives in GLMFLEET_FLEET_DIR (default /var/lib/glmfleet-localfleet, -slotN for slot N):

    base-<hash>/            root filesystem built by mmdebstrap, cached by its build arguments;
                            never changed once built (hosts' overlays sit on it)
    base-<hash>.log         mmdebstrap's output
    id_ed25519[.pub]        the SSH key that logs in as root on every host
    known_hosts             each host's own ed25519 host key, for strict host key checking
    hosts.json              [{"name", "network" ("shared" or "linked"), "address", "ssh_port",
                              "vllm_port", "ssh_key", "known_hosts", "base", "upper",
                              "console_log", "link" (a linked host's shaping)}, ...] for every
                              host created, up or not
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
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

DEFAULT_FLEET_DIR = "/var/lib/glmfleet-localfleet"
FIRST_SSH_PORT = 2201
# Shared hosts share the machine's network: vLLM's default port 8000 would collide between them.
FIRST_VLLM_PORT = 8001
MAX_HOSTS = 99  # host names have two digits
# Linked hosts: production's ports, each host at its own address.
LINKED_SSH_PORT = 22
LINKED_VLLM_PORT = 8000
# 10.77.N.0/24 for slot N: the machine (the bridge) at .254, host K at .K. Checked against the
# machine's own addresses and routes before the bridge is made.
LINKED_NETWORK = "10.77.{slot}.0/24"
BRIDGE_HOST_NUMBER = 254
# tbf's bucket: 64 KiB skbs come through a veth with GSO, so the burst must hold several; its queue:
# 50 ms at the rate (tc-tbf(8)).
TBF_BURST_BYTES = 256 * 1024
TBF_LATENCY_MS = 50

DEBIAN_COMPONENTS = "main contrib non-free non-free-firmware"  # the NVIDIA role needs non-free
MMDEBSTRAP_ARGS = [
    "--variant=minbase",
    # rsync: linked hosts reach no archive, and the weights role copies with it.
    "--include=systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,iproute2,sudo,ca-certificates,curl,rsync",
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
REQUIRED_TOOLS = ["mmdebstrap", "systemd-nspawn", "unshare", "mount", "ssh", "ssh-keygen", "ip", "tc"]

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


def host_name(index: int, linked: bool = False) -> str:
    slot = fleet_slot()
    return f"fleet{slot if slot else ''}-{'n' if linked else ''}{index:02d}"


def linked_network() -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(LINKED_NETWORK.format(slot=fleet_slot()))


def bridge_name() -> str:
    return f"glmfleet{fleet_slot()}"


def bridge_address() -> str:
    """The machine's own address on the linked hosts' network: where they reach a server it runs."""
    return str(linked_network()[BRIDGE_HOST_NUMBER])


# --- the Python API -------------------------------------------------------------------------


def load_hosts() -> list[dict]:
    """The hosts that are up (powered on: booted, booting or rebooting), as in hosts.json."""
    return [host for host in _read_hosts() if is_up(host)]


def up(count: int = 2, links: bool = False) -> list[dict]:
    """Makes hosts 1..count of one kind (shared, or with ``links`` linked: see the module's
    docstring) up and ready, leaving hosts already up as they are; returns every host that is up."""
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
        if links:
            _ensure_bridge()
        hosts = {host["name"]: host for host in _read_hosts()}
        wanted = [host_name(index, links) for index in range(1, count + 1)]
        for index, name in enumerate(wanted, start=1):
            if name not in hosts:
                hosts[name] = _create_host(base, name, index, links)
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
    _remove_bridge()
    if destroy:
        remove_tree(fleet_dir() / "hosts")
        _write_hosts([])


def stop_host(name: str, force: bool = False) -> None:
    """Power one host off: orderly (systemd shuts down), or with force like pulling the plug."""
    with _fleet_lock():
        _stop(_host(name), force=force)


def start_host(name: str) -> None:
    """Boot one host that was created before and wait until it is ready."""
    with _fleet_lock():
        host = _host(name)
        if host["network"] == "linked":
            _ensure_bridge()
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
                "ssh_hostname": host["address"],
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
        f"root@{host['address']}",
    ]


# --- state files ----------------------------------------------------------------------------


def _hosts_file() -> Path:
    return fleet_dir() / "hosts.json"


def _read_hosts() -> list[dict]:
    try:
        hosts = json.loads(_hosts_file().read_text())
    except FileNotFoundError:
        return []
    # Hosts written before linked hosts existed are shared ones.
    return [{"network": "shared", "address": "127.0.0.1", **host} for host in hosts]


def _write_hosts(hosts: list[dict]) -> None:
    hosts = sorted(hosts, key=lambda host: host["name"])
    temporary = _hosts_file().with_suffix(".tmp")
    temporary.write_text(json.dumps(hosts, indent=2) + "\n")
    temporary.replace(_hosts_file())
    # Rewritten with hosts.json so a re-created host's new key replaces the old one.
    known_hosts = "".join(f"{_known_hosts_name(host)} {_host_public_key(host)}\n" for host in hosts)
    (fleet_dir() / "known_hosts").write_text(known_hosts)


def _known_hosts_name(host: dict) -> str:
    """How ssh names the host in known_hosts: ``[address]:port`` unless the port is 22."""
    port = host["ssh_port"]
    return host["address"] if port == 22 else f"[{host['address']}]:{port}"


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
    remove_tree(partial)
    print(f"localfleet: building the base root filesystem in {base} (log: {log})", flush=True)
    with open(log, "w") as log_file:
        result = subprocess.run(
            ["mmdebstrap", *ca_hooks, *MMDEBSTRAP_ARGS, str(partial), *APT_SOURCES],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        remove_tree(partial)
        raise FleetError(f"mmdebstrap failed (exit {result.returncode}); see {log}")
    # Each host makes its own host key: the overlay cannot hide these without whiteouts.
    for shared_key in (partial / "etc" / "ssh").glob("ssh_host_*"):
        shared_key.unlink()
    for unit in MASKED_UNITS:
        (partial / "etc" / "systemd" / "system" / unit).symlink_to("/dev/null")
    partial.rename(base)


def remove_tree(path: Path, check: bool = False) -> None:
    """``rm -rf``, in a child process, never into a host's mounted root (--one-file-system).
    Not shutil.rmtree: in a process that pyinfra has patched with gevent (the tests' own),
    gevent's os.close defers closing a directory to its event loop, which a long rmtree never
    lets run, so every directory of the tree stays open until it ends: a host that had installed
    vLLM (10^5 directories) ran the test session out of file descriptors (issue 18)."""
    result = subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise FleetError(f"could not remove {path}: {result.stderr.strip()}")


def _remove_unused_bases(keep: Path) -> None:
    """Bases built from other arguments, once no host's overlay sits on them any more."""
    in_use = {keep.name} | {Path(host["base"]).name for host in _read_hosts()}
    for base in fleet_dir().glob("base-*"):
        if base.is_dir() and base.name not in in_use:
            remove_tree(base, check=True)
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


def _create_host(base: Path, name: str, index: int, linked: bool) -> dict:
    """A new host: an empty upper layer over the base, holding what makes it a distinct machine.
    An overlay rather than a copy of the base: on our 2-core VM, 16 copies took 21-66 s to
    create and 35 s to delete (4.6 GB), against milliseconds; base files share page cache."""
    if linked:
        address, ssh_port, vllm_port = str(linked_network()[index]), LINKED_SSH_PORT, LINKED_VLLM_PORT
    else:
        offset = 100 * fleet_slot() + index - 1
        address, ssh_port, vllm_port = "127.0.0.1", FIRST_SSH_PORT + offset, FIRST_VLLM_PORT + offset
    host_dir = fleet_dir() / "hosts" / name
    remove_tree(host_dir)
    for layer in ("upper", "work", "root"):
        (host_dir / layer).mkdir(parents=True)
    _write_host_identity(base, host_dir / "upper", name, ssh_port)
    if linked:
        _write_link_unit(base, host_dir / "upper", f"{address}/{linked_network().prefixlen}")
    return {
        "name": name,
        "network": "linked" if linked else "shared",
        "address": address,
        "ssh_port": ssh_port,
        "vllm_port": vllm_port,
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
    # A shared host listens on loopback alone, on its own port; a linked one as a production host does.
    listen = "ListenAddress 127.0.0.1\n" if ssh_port != LINKED_SSH_PORT else ""
    (_upper_dir(base, upper, "etc/ssh/sshd_config.d") / "glmfleet-localfleet.conf").write_text(
        f"Port {ssh_port}\n"
        f"{listen}"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
    )
    authorized_keys = _upper_dir(base, upper, "root/.ssh") / "authorized_keys"
    shutil.copyfile(f"{_ssh_key()}.pub", authorized_keys)
    authorized_keys.chmod(0o600)


def _write_link_unit(base: Path, upper: Path, address: str) -> None:
    """A linked host's address on host0, the container's end of the veth that systemd-nspawn
    makes (--network-bridge): set by a unit before the network is up, as a host's own network
    configuration would. No default route: anything beyond the fleet's network is unreachable
    at once, not after a timeout."""
    unit = "glmfleet-link.service"
    (_upper_dir(base, upper, "etc/systemd/system") / unit).write_text(
        "[Unit]\n"
        "Description=glmfleet local fleet: this host's address on the fleet bridge\n"
        "DefaultDependencies=no\n"
        "Before=network-pre.target network.target ssh.service\n"
        "Wants=network-pre.target\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart=/usr/sbin/ip address replace {address} dev host0\n"
        "ExecStart=/usr/sbin/ip link set host0 up\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    wants = _upper_dir(base, upper, "etc/systemd/system/multi-user.target.wants")
    (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


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
    if host["network"] == "shared" and _port_in_use(host["ssh_port"]):
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


# --- linked hosts' network: the bridge, each host's veth, shaping -----------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run_net(["ip", *args], check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run_net(["tc", *args], check)


def _run_net(argv: list[str], check: bool) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise FleetError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def _interface_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _ensure_bridge() -> None:
    """The linked hosts' bridge with the machine's address on it; refused where the network
    would overlap one the machine already has (its traffic must never leave for the outside)."""
    bridge, network = bridge_name(), linked_network()
    if not _interface_exists(bridge):
        for route in json.loads(_ip("-json", "route", "show", "table", "all").stdout):
            destination = route.get("dst", "")
            if destination in ("default", "") or ":" in destination or route.get("type") not in (None, "unicast"):
                continue
            if ipaddress.IPv4Network(destination, strict=False).overlaps(network):
                raise FleetError(
                    f"the linked hosts' network {network} overlaps the machine's route {destination} "
                    f"(dev {route.get('dev')}): use another GLMFLEET_FLEET_SLOT"
                )
        _ip("link", "add", bridge, "type", "bridge")
    _ip("address", "replace", f"{bridge_address()}/{network.prefixlen}", "dev", bridge)
    _ip("link", "set", bridge, "up")


def _remove_bridge() -> None:
    if _interface_exists(bridge_name()):
        _ip("link", "delete", bridge_name())


def host_interface(host: dict) -> str:
    """The machine's end of a linked host's veth (systemd-nspawn names it vb-MACHINE)."""
    return f"vb-{host['name']}"


def _ifb_interface(host: dict) -> str:
    """Where a linked host's upload is shaped: what the host sends arrives as ingress on its
    veth, which tc can only police, so it is redirected to an ifb device and shaped leaving it."""
    return f"ifb-{host['name']}"


def shape(name: str, rate_mbit: float | None = None, delay_ms: float | None = None, loss_pct: float | None = None):
    """Set a linked host's link: ``rate_mbit`` both ways (tbf), ``delay_ms`` and ``loss_pct`` each
    way (netem); None for each leaves the link unshaped. Kept with the host: applied again at
    every boot, and at once if it is up."""
    link = {"rate_mbit": rate_mbit, "delay_ms": delay_ms, "loss_pct": loss_pct}
    for key, value in link.items():
        if value is not None and not value > 0:
            raise FleetError(f"{key} must be a number > 0, not {value!r}")
    with _fleet_lock():
        hosts = _read_hosts()
        host = next((h for h in hosts if h["name"] == name), None)
        if host is None or host["network"] != "linked":
            raise FleetError(f"{name} is not a linked host of {_hosts_file()}: `up --links` makes them")
        previous, host["link"] = host.get("link", {}), {key: value for key, value in link.items() if value is not None}
        if is_up(host) and _interface_exists(host_interface(host)):
            try:
                _apply_link(host)
            except FleetError:
                host["link"] = previous
                _apply_link(host)
                raise
        _write_hosts(hosts)


def set_link(name: str, carrier: bool) -> None:
    """Cut a linked host's link (as a pulled cable: its connections stall, its address stays)
    or restore it."""
    host = _host(name)
    if host["network"] != "linked":
        raise FleetError(f"{name} is not a linked host: only those have a link to cut")
    _ip("link", "set", host_interface(host), "up" if carrier else "down")


def link_bytes(name: str) -> dict[str, int]:
    """Bytes through a linked host's link since its boot: ``sent`` by the host, ``received`` by it."""
    statistics = Path("/sys/class/net", host_interface(_host(name)), "statistics")
    # The veth's machine end: what it receives the host sent.
    return {
        "sent": int((statistics / "rx_bytes").read_text()),
        "received": int((statistics / "tx_bytes").read_text()),
    }


def bridge_bytes() -> dict[str, int]:
    """Bytes the machine itself sent to and received from the linked hosts (servers it runs for
    them: a hub, a package index, pushes from the control node)."""
    statistics = Path("/sys/class/net", bridge_name(), "statistics")
    return {"sent": int((statistics / "tx_bytes").read_text()), "received": int((statistics / "rx_bytes").read_text())}


def _shaping_qdiscs(link: dict) -> list[list[str]]:
    """tc's qdiscs for one direction of a link, each as what follows ``tc qdisc add dev DEVICE``:
    tbf for the rate, netem under it (or alone) for delay and loss."""
    netem = []
    if link.get("delay_ms"):
        netem += ["delay", f"{link['delay_ms']}ms"]
    if link.get("loss_pct"):
        netem += ["loss", f"{link['loss_pct']}%"]
    qdiscs = []
    if link.get("rate_mbit"):
        rate = ["rate", f"{link['rate_mbit']}mbit", "burst", str(TBF_BURST_BYTES), "latency", f"{TBF_LATENCY_MS}ms"]
        qdiscs.append(["root", "handle", "1:", "tbf", *rate])
    if netem:
        qdiscs.append([*(["parent", "1:1", "handle", "10:"] if qdiscs else ["root", "handle", "1:"]), "netem", *netem])
    return qdiscs


def _apply_link(host: dict) -> None:
    """Shape both directions of the host's veth, from the machine's side (the host cannot undo
    it): egress of its veth end is what the host receives; ingress, redirected to the host's
    ifb device, what it sends."""
    veth, ifb = host_interface(host), _ifb_interface(host)
    qdiscs = _shaping_qdiscs(host.get("link", {}))
    for device in (veth, ifb):
        _tc("qdisc", "delete", "dev", device, "root", check=False)
    _tc("qdisc", "delete", "dev", veth, "ingress", check=False)
    if not qdiscs:
        if _interface_exists(ifb):
            _ip("link", "delete", ifb)
        return
    if not _interface_exists(ifb):
        _ip("link", "add", ifb, "type", "ifb")
    _ip("link", "set", ifb, "up")
    _tc("qdisc", "add", "dev", veth, "handle", "ffff:", "ingress")
    _tc(
        "filter", "add", "dev", veth, "parent", "ffff:", "protocol", "all",
        "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb,
    )  # fmt: skip
    for device in (veth, ifb):
        for qdisc in qdiscs:
            result = _tc("qdisc", "add", "dev", device, *qdisc, check=False)
            if result.returncode != 0:
                no_netem = "netem" in qdisc and "unknown" in result.stderr.lower()
                raise FleetError(
                    f"{host['name']}: `tc qdisc add dev {device} {' '.join(qdisc)}` failed: {result.stderr.strip()}"
                    + (
                        "; this kernel has no netem: delay and loss cannot be emulated here (rate can)"
                        if no_netem
                        else ""
                    )
                )


def _apply_link_when_up(name: str, nspawn: subprocess.Popen) -> None:
    """Shape a booting host's new veth as soon as systemd-nspawn has made it, in a thread (the
    supervisor waits on the container meanwhile)."""

    def apply():
        host = _host(name)
        while nspawn.poll() is None and not _interface_exists(host_interface(host)):
            time.sleep(0.05)
        if nspawn.poll() is None:
            try:
                _apply_link(_host(name))
            except FleetError as error:
                print(f"localfleet: {error}", flush=True)

    threading.Thread(target=apply, daemon=True).start()


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
            if host["network"] == "linked":
                # Each boot makes a new veth: shape it as the host's link is set.
                _apply_link_when_up(name, nspawn)
            status = nspawn.wait()
            if status != CONTAINER_REBOOTED:
                return status
            print(f"localfleet: {name} rebooted; booting it again", flush=True)
        return 0
    finally:
        _leave_cgroups(cgroups)
        if host["network"] == "linked":
            _ip("link", "delete", _ifb_interface(host), check=False)


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
        # A network namespace of its own, its veth's other end on the fleet's bridge.
        *([f"--network-bridge={bridge_name()}"] if host["network"] == "linked" else []),
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
        link = " ".join(f"{key}={value}" for key, value in host.get("link", {}).items())
        print(
            f"{host['name']}  {state:4}  ssh {host['address']}:{host['ssh_port']}  "
            f"vllm {host['address']}:{host['vllm_port']}  {Path(host['upper']).parent}"
            + (f"  link: {link}" if link else "")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devfleet.localfleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="create and boot hosts, wait until ready")
    up_parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up_parser.add_argument(
        "--links", action="store_true", help="linked hosts: each in its own network namespace on the fleet's bridge"
    )
    shape_parser = commands.add_parser("shape", help="shape linked hosts' links (no option: unshaped)")
    shape_parser.add_argument("name", help="a linked host, or 'all' for every linked host")
    shape_parser.add_argument("--rate", type=float, help="Mbit/s each way")
    shape_parser.add_argument("--delay", type=float, help="ms each way (needs netem in the kernel)")
    shape_parser.add_argument("--loss", type=float, help="percent of packets each way (needs netem)")
    link_parser = commands.add_parser("link", help="cut a linked host's link, or restore it")
    link_parser.add_argument("name")
    link_parser.add_argument("state", choices=("up", "down"))
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
            up(args.hosts, links=args.links)
            _print_status()
        elif args.command == "shape":
            names = (
                [args.name] if args.name != "all" else [h["name"] for h in _read_hosts() if h["network"] == "linked"]
            )
            for name in names:
                shape(name, args.rate, args.delay, args.loss)
            _print_status()
        elif args.command == "link":
            set_link(args.name, args.state == "up")
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

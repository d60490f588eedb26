"""Every fact glmfleet reads from a host, in one place.

pyinfra asks a fact again on every call and each is a command of its own, so each fact gathers
all it needs in one command, ``ask`` asks it once per host and run, and each role declares its
questions so that ``ask_together`` can ask them all in a single command per host.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import NamedTuple
from weakref import WeakKeyDictionary

from gevent.event import Event
from pyinfra.api import FactBase, State, StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.host import Host

from glmfleet import FILES
from glmfleet.layout import (
    COMPLETE_MARKER,
    DKMS_SIGNING_KEYS,
    EFI_SECURE_BOOT_VAR,
    MADE_DIRS_RECORD,
    ROOT_AUTHORIZED_KEYS,
    SSH_HOST_KEY_PUB,
)
from glmfleet.shell import join, quote


_ANSWERS: WeakKeyDictionary[State, dict] = WeakKeyDictionary()
_ASKING: WeakKeyDictionary[State, dict[tuple, Event]] = WeakKeyDictionary()


class Question(NamedTuple):
    """A fact and its arguments: one thing a role reads from a host."""

    fact: type[FactBase]
    kwargs: dict

    def of(self, host: Host):
        return ask(host, self.fact, **self.kwargs)


def _key(host: Host, question: Question) -> tuple:
    return host.name, question.fact, repr(sorted(question.kwargs.items()))


def ask(host: Host, fact_cls: type[FactBase], **kwargs):
    """``host.get_fact``, asked once per host and run: pyinfra asks the host again on every call.

    Sound because every role asks while planning, before anything in the run changes the host;
    each run (a rollout makes several) has its own State and so its own answers.
    """
    answers = _ANSWERS.setdefault(host.state, {})
    key = _key(host, Question(fact_cls, kwargs))
    _wait_for(host, [key])
    if key not in answers:
        with _asking(host, [key]):
            answers[key] = host.get_fact(fact_cls, **kwargs)
    return answers[key]


def ask_together(host: Host, questions: dict[str, Question]) -> dict:
    """The answers to ``questions`` (by the same names); those not asked yet in this run are
    asked in one command.

    Each command is an SSH session of its own on the host and, on one host, a round trip
    after the last: the roles' dozen questions cost one. The questions of a fact that can
    merge them (``merged`` and ``part``, as ``ManagedPaths``) are asked as one. A question
    whose command fails, or whose ``requires_command`` is missing, is left to ``ask``, so
    that pyinfra reports it as it reports any fact.
    """
    answers = _ANSWERS.setdefault(host.state, {})
    keyed = {_key(host, q): q for q in questions.values()}
    _wait_for(host, keyed)
    new = {key: q for key, q in keyed.items() if key not in answers}
    if new:
        with _asking(host, new):
            batch = merged_questions(list(new.values()))
            facts = [(asked.fact(), asked) for asked, _ in batch]
            # A batch that fails as a whole (not one of its parts) leaves every question to ask.
            parts = host.get_fact(Together, commands=[together_part(fact, asked.kwargs) for fact, asked in facts],
                                  _ignore_errors=True)
            for (fact, _), (_, answered), (status, lines) in zip(facts, batch, parts):
                if status != 0:
                    continue
                try:
                    answer = fact.process(lines) if lines else fact.default()
                except FactProcessError:
                    continue
                for q in answered:
                    answers[_key(host, q)] = q.fact.part(answer, **q.kwargs) if hasattr(q.fact, "part") else answer
    return {name: q.of(host) for name, q in questions.items()}


@contextmanager
def _asking(host: Host, keys) -> Iterator[None]:
    """Marks ``keys`` as being asked of ``host``. pyinfra plans hosts side by side in greenlets,
    and one host's plan may read another's facts (the peer fan-out reads every host's
    weights): a greenlet that needs them meanwhile waits for this answer instead of asking again."""
    asking = _ASKING.setdefault(host.state, {})
    done = Event()
    for key in keys:
        asking[key] = done
    try:
        yield
    finally:
        for key in keys:
            asking.pop(key, None)
        done.set()


def _wait_for(host: Host, keys) -> None:
    asking = _ASKING.get(host.state, {})
    for done in {id(asking[key]): asking[key] for key in keys if key in asking}.values():
        done.wait()


def merged_questions(questions: list[Question]) -> list[tuple[Question, list[Question]]]:
    """The questions to ask, each with those its answer answers: all of a fact's questions as
    one where the fact can merge them, the others each alone."""
    batch: list[tuple[Question, list[Question]]] = []
    by_fact: dict[type[FactBase], list[Question]] = {}
    for q in questions:
        if hasattr(q.fact, "merged"):
            by_fact.setdefault(q.fact, []).append(q)
        else:
            batch.append((q, [q]))
    batch += [(Question(fact, fact.merged([q.kwargs for q in group])), group) for fact, group in by_fact.items()]
    return batch


def together_part(fact: FactBase, kwargs: dict) -> str:
    """A fact's command as one part of ``Together``: in a subshell (an ``exit`` ends only the
    part), first failing with 127 where its ``requires_command`` is missing."""
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    if isinstance(command, StringCommand):  # str() would show masked values as masked
        command = command.get_raw_value()
    requires = fact.requires_command(**kwargs) if callable(fact.requires_command) else fact.requires_command
    check = f"command -v {quote(requires)} >/dev/null 2>&1 || exit 127; " if requires else ""
    # The newline ends a trailing comment or heredoc of the fact's command inside its part.
    return f"( {check}{command}\n)"


TOGETHER = "::glmfleet-part::"


class Together(FactBase):
    """Several facts' commands run in one, each part's output lines with its exit status.

    .. code:: python

        [(0, ["line", ...]), (127, [])]
    """

    default = list

    def command(self, commands: list[str]) -> str:
        return "; ".join(f"echo '{TOGETHER}'; {command}; echo \"{TOGETHER} $?\"" for command in commands)

    def process(self, output):
        parts, lines = [], []
        for line in output:
            before, marker, status = line.partition(TOGETHER)
            if before or not marker:  # a part's output may lack its last newline
                lines.append(before)
            if marker and status:
                parts.append((int(status), lines))
            elif marker:
                lines = []
        return parts


class VllmVenvs(FactBase):
    """The venvs under a glmfleet vLLM root: which are complete (the completion marker there,
    and every file it records there: the interpreter, the vllm entry point, the package's
    metadata and module), and where ``current`` and ``previous`` point, plus whether the pinned
    uv is installed.

    .. code:: python

        {"uv": True, "current": "vllm-0.22.0-ab12", "previous": None, "complete": ["vllm-0.22.0-ab12"]}
    """

    def command(self, root: str, uv: str) -> str:
        root, uv = quote(root), quote(uv)
        return (
            f"test -x {uv} && echo uv=1; "
            f"cd {root} 2>/dev/null || exit 0; "
            # One find for both links (readlink was a process each): an absent one prints nothing, a
            # non-link an empty target.
            "find current previous -maxdepth 0 -printf '%f=%l\\n' 2>/dev/null; "
            # ${d%/} and ${d##*/}, not basename: every host runs this every run, a process per venv.
            # A marker's record, a relative path a line (no spaces: bin/, lib/python3.X/site-packages/),
            # must all be there; test -e follows the interpreter's link: a python gone is a venv gone.
            # An empty marker (an older glmfleet's) records the interpreter and the entry point.
            f"for d in venvs/*/; do m=\"$d{COMPLETE_MARKER}\"; test -e \"$m\" || continue; whole=1; "
            "for f in bin/python bin/vllm; do test -e \"$d$f\" || whole=; done; "
            "while read -r f; do test -e \"$d$f\" || whole=; done < \"$m\"; "
            "test -n \"$whole\" && { d=${d%/}; echo complete=${d##*/}; }; done; "
            "true"
        )

    @staticmethod
    def default():
        return {"uv": False, "current": None, "previous": None, "complete": []}

    def process(self, output):
        state = self.default()
        for line in output:
            key, _, value = line.partition("=")
            if key == "uv":
                state["uv"] = True
            elif key in ("current", "previous") and value:
                state[key] = value.rsplit("/", 1)[-1]
            elif key == "complete":
                state["complete"].append(value)
        return state


class VllmServes(FactBase):
    """Whether the vLLM on this host serves right now: the verify script run once, without
    waiting (one real chat completion; ``/health`` and ``/v1/models`` where it is answered with an
    error). The deploy makes the same check from the controller where it can (``roles.verify.serving_now``).

    Returns ``{"ok": bool, "detail": last line of the script's output}``.
    """

    def command(self, verify_argv: list[str]) -> str:
        script = quote(verify_argv[0])
        return f"test -x {script} || {{ echo 'verify script not installed'; exit 0; }}; {join(verify_argv)} --deadline 0 2>&1; echo rc=$?"

    @staticmethod
    def default():
        return {"ok": False, "detail": "no answer"}

    def process(self, output):
        ok = bool(output) and output[-1] == "rc=0"
        detail = output[-2] if len(output) > 1 else (output[0] if output else "")
        return {"ok": ok, "detail": detail}


# For each line of `ss -Hltnp`: the port of the local address and the service of the first
# holder in one, "-" for none (a socket-activated port is also held by systemd, PID 1, outside
# any service). `proc`: where the holders' /proc entries are. One awk for every listener: a
# shell loop forked five processes per listener.
LISTENER_SERVICE = r"""{
    port = $4; sub(/.*:/, "", port); unit = "-"; holders = $0
    while (unit == "-" && match(holders, /pid=[0-9]+/)) {
        cgroup = proc "/" substr(holders, RSTART + 4, RLENGTH - 4) "/cgroup"
        holders = substr(holders, RSTART + RLENGTH)
        while (unit == "-" && (getline line < cgroup) > 0)
            if (match(line, /[^\/]*\.service/)) unit = substr(line, RSTART, RLENGTH)
        close(cgroup)
    }
    print port, unit
}"""


class ListeningPorts(FactBase):
    """Every listening TCP port and the systemd service whose process holds it (None: a process
    outside any service, or one ``ss`` cannot see), from ``ss`` and the holder's cgroup.

    .. code:: python

        [(22, "ssh.service"), (8000, "vllm.service"), (9000, None)]
    """

    default = list

    def command(self, port: int | None = None) -> str:
        """port: only that port's listeners."""
        only = f" '( sport = :{int(port)} )'" if port else ""
        return f"ss -Hltnp{only} | awk -v proc=/proc {quote(LISTENER_SERVICE)}"

    def requires_command(self, port: int | None = None) -> str:
        return "ss"

    def process(self, output):
        listeners = []
        for line in output:
            port, _, unit = line.partition(" ")
            if port.isdigit():
                listeners.append((int(port), None if unit == "-" else unit))
        return listeners


class Glm4Source(FactBase):
    """The sha256 of vLLM's ``glm4.py`` in a venv (None when the venv has no such file)."""

    def command(self, venv: str) -> str:
        path = f"{quote(venv)}/lib/python3*/site-packages/vllm/model_executor/models/glm4.py"
        return f"for f in {path}; do test -f \"$f\" && sha256sum \"$f\"; done; true"

    def process(self, output):
        return output[0].split()[0] if output else None


# --- the GPU stack ---------------------------------------------------------------------------

SECTION = "::glmfleet::"
NVIDIA_VENDOR = "10de"
# PCI class codes (pci.ids "C" list): display controllers that are GPUs, and the bridge class
# NVSwitch reports itself as.
GPU_CLASSES = ("0300", "0302")
NVSWITCH_CLASS = "0680"
# NVIDIA assigns PCI device ids in order of generation: 0x23xx Hopper, 0x26xx-0x28xx Ada,
# 0x29xx and up Blackwell (GB100/GB20x) and later, which only the open kernel modules drive.
FIRST_OPEN_ONLY_DEVICE = 0x2900
SMI_QUERY = "index,name,pci.bus_id,driver_version,memory.total,persistence_mode,compute_cap"


def split_sections(output: list[str]) -> dict[str, list[str]]:
    """The lines of a sectioned fact output (``::glmfleet:: NAME`` starts a section)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        if line.startswith(SECTION):
            current = line[len(SECTION):].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def parse_lspci(lines: list[str]) -> list[dict]:
    """NVIDIA devices from ``lspci -nn`` lines, or from the sysfs fallback's
    ``sysfs SLOT 0xCLASS 0xDEVICE`` lines when pciutils is not installed.

    ``lspci -nn`` prints ``SLOT CLASS NAME [cccc]: VENDOR DEVICE NAME [vvvv:dddd] (rev rr)``.
    """
    devices = []
    for line in lines:
        if line.startswith("sysfs "):
            _, slot, pci_class, device = line.split()
            if pci_class.startswith("0x"):
                devices.append({"slot": slot, "class": pci_class[2:6], "device": device[2:].lower(), "name": None})
            continue
        match = re.match(
            r"^(?P<slot>\S+) (?P<class_name>.*?) \[(?P<class>[0-9a-f]{4})\]: (?P<name>.*) "
            r"\[(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})\]",
            line,
        )
        if match and match["vendor"] == NVIDIA_VENDOR:
            name = re.sub(r"^NVIDIA Corporation ", "", match["name"])
            devices.append({"slot": match["slot"], "class": match["class"], "device": match["device"], "name": name})
    return devices


def parse_smi_query(lines: list[str]) -> list[dict] | None:
    """GPUs from ``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits``, or None
    when nvidia-smi could not talk to a driver (its message is not CSV)."""
    fields = SMI_QUERY.split(",")
    gpus = []
    for row in csv.reader(line for line in lines if line.strip()):
        cells = [cell.strip() for cell in row]
        if len(cells) != len(fields):
            return None
        gpu = dict(zip(fields, cells))
        gpus.append({
            "index": int(gpu["index"]),
            "name": gpu["name"],
            "bus_id": gpu["pci.bus_id"],
            "driver_version": gpu["driver_version"],
            "memory_mib": int(gpu["memory.total"]) if gpu["memory.total"].isdigit() else None,
            "persistence_mode": gpu["persistence_mode"] == "Enabled",
            "compute_cap": gpu["compute_cap"],
        })
    return gpus or None


def parse_cuda_version(lines: list[str]) -> str | None:
    """The CUDA version the driver supports, from ``nvidia-smi --version``, ``nvidia-smi``'s
    header or ``nvidia-smi -q``; drivers from 610 on name it "CUDA UMD Version"."""
    for line in lines:
        match = re.search(r"CUDA (?:UMD )?Version\s*:?\s*([0-9]+\.[0-9]+)", line)
        if match:
            return match[1]
    return None


def parse_driver_module(lines: list[str]) -> dict | None:
    """The loaded kernel module, from ``/proc/driver/nvidia/version`` (absent: none loaded).

    ``NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.261.03  <build date>``, or
    ``NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build ...``
    """
    for line in lines:
        match = re.match(r"^NVRM version: .*?\s([0-9]{3}\.[0-9]+(?:\.[0-9]+)?)\s", line + " ")
        if match:
            return {"version": match[1], "open": "Open Kernel Module" in line}
    return None


def parse_secure_boot(lines: list[str]) -> bool:
    """Secure Boot enforcing: ``mokutil --sb-state`` says so, or the EFI variable's data byte
    (after four attribute bytes, as ``od -An -t u1`` prints it) is 1."""
    for line in lines:
        if line.strip() == "SecureBoot enabled":
            return True
        if line.startswith("efivar "):
            values = line.split()[1:]
            return len(values) == 5 and values[4] == "1"
    return False


class GpuHost(FactBase):
    """Everything the driver role decides on, in one round trip: distro, kernel and headers,
    NVIDIA PCI devices (GPUs, NVSwitches), the running driver as ``nvidia-smi`` and the
    kernel see it, loaded modules, Secure Boot and whether a DKMS signing key is enrolled.

    .. code:: python

        {"distro": "ubuntu", "distro_version": "22.04", "codename": "jammy", "arch": "amd64",
         "kernel": "5.15.0-1-generic", "kernel_headers": True, "kernel_headers_candidate": "5.15.0-1.1",
         "gpus": [{"slot": "18:00.0", "class": "0302", "device": "2330", "name": "GH100 [H100 SXM5 80GB]"}],
         "nvswitches": 0, "open_modules_required": False, "smi": [{"index": 0, ...}] or None,
         "cuda_version": "12.4", "module": {"version": "550.54.15", "open": False} or None,
         "nouveau_loaded": False, "secure_boot": False, "signing_key_enrolled": False}
    """

    def command(self, headers_candidate: bool = True) -> str:
        """headers_candidate: also ask apt for the kernel headers' candidate version, where no
        headers are installed (apt-cache takes most of this command's time: 0.17 s of 0.2)."""
        # Processes are the cost of this command, which every host runs every run (a fork and
        # exec is ~1 ms of a host's CPU): the shell reads the kernel's release, the PCI IDs and
        # the loaded modules itself, from the files uname, grep and awk would read.
        return "; ".join([
            f"echo '{SECTION} os'", '. /etc/os-release && echo "$ID|$VERSION_ID|$VERSION_CODENAME"',
            f"echo '{SECTION} arch'", "dpkg --print-architecture",
            f"echo '{SECTION} kernel'", 'read -r kernel < /proc/sys/kernel/osrelease', 'echo "$kernel"',
            'test -e "/lib/modules/$kernel/build/Makefile" && echo headers',
            f"echo '{SECTION} headers_candidate'",
            *(['test -e "/lib/modules/$kernel/build/Makefile" || '
               "LC_ALL=C apt-cache policy linux-headers-\"$kernel\" 2>/dev/null | sed -n 's/^ *Candidate: //p'"]
              if headers_candidate else []),
            f"echo '{SECTION} pci'",
            # Without lspci, the shell's read finds NVIDIA's devices among the hundreds of PCI
            # functions a server has, with no process per function.
            f"if command -v lspci >/dev/null; then lspci -nn -d {NVIDIA_VENDOR}:; else "
            'for v in /sys/bus/pci/devices/*/vendor; do read -r vendor 2>/dev/null < "$v" || continue; '
            f'[ "$vendor" = 0x{NVIDIA_VENDOR} ] || continue; d=${{v%/vendor}}; '
            'read -r class < "$d/class"; read -r device < "$d/device"; echo "sysfs ${d##*/} $class $device"; done; fi',
            f"echo '{SECTION} smi'",
            f"command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu={SMI_QUERY} --format=csv,noheader,nounits 2>&1",
            # --version asks the driver for its versions alone (25 ms on an H100), where the status
            # table (35 ms with one GPU) grows with the GPUs and their processes; a driver whose
            # nvidia-smi lacks --version prints the table.
            f"echo '{SECTION} cuda'",
            "command -v nvidia-smi >/dev/null && { nvidia-smi --version || nvidia-smi; } 2>/dev/null | grep -m1 -E 'CUDA (UMD )?Version'",
            f"echo '{SECTION} module'", "cat /proc/driver/nvidia/version 2>/dev/null",
            # A loaded module's /sys/module/NAME/initstate is what lsmod's /proc/modules lists.
            f"echo '{SECTION} modules'", "for module in nouveau nvidia; do [ -e /sys/module/$module/initstate ] && echo $module; done",
            f"echo '{SECTION} secure_boot'",
            f"if command -v mokutil >/dev/null; then mokutil --sb-state 2>&1; elif [ -e {EFI_SECURE_BOOT_VAR} ]; then "
            f'echo "efivar $(od -An -t u1 {EFI_SECURE_BOOT_VAR})"; fi',
            f"echo '{SECTION} signing_keys'",
            f"for key in {' '.join(DKMS_SIGNING_KEYS)}; do [ -e $key ] && command -v mokutil >/dev/null && "
            'mokutil --test-key $key 2>&1; done',
            "true",
        ])

    def process(self, output):
        return gpu_host(split_sections(output))

    def default(self):
        return self.process([])


def gpu_host(sections: dict[str, list[str]]) -> dict:
    """The GpuHost fact from its sections (see GpuHost.command for what each holds)."""
    distro, distro_version, codename = (sections.get("os") or ["||"])[0].split("|")
    kernel = sections.get("kernel") or [""]
    devices = parse_lspci(sections.get("pci", []))
    gpus = [device for device in devices if device["class"] in GPU_CLASSES]
    modules = set(sections.get("modules", []))
    return {
        "distro": distro,
        "distro_version": distro_version,
        "codename": codename,
        "arch": (sections.get("arch") or [""])[0],
        "kernel": kernel[0],
        "kernel_headers": "headers" in kernel[1:],
        "kernel_headers_candidate": next((c for c in sections.get("headers_candidate", []) if c != "(none)"), None),
        "gpus": gpus,
        "nvswitches": sum(device["class"] == NVSWITCH_CLASS for device in devices),
        "open_modules_required": any(int(gpu["device"], 16) >= FIRST_OPEN_ONLY_DEVICE for gpu in gpus),
        "smi": parse_smi_query(sections.get("smi", [])),
        "cuda_version": parse_cuda_version(sections.get("cuda", [])),
        "module": parse_driver_module(sections.get("module", [])),
        "nouveau_loaded": "nouveau" in modules,
        "secure_boot": parse_secure_boot(sections.get("secure_boot", [])),
        "signing_key_enrolled": any("is already enrolled" in line for line in sections.get("signing_keys", [])),
    }


class DriverBranchesOffered(FactBase):
    """The NVIDIA driver branches the host's apt lists offer from its distribution: Ubuntu's
    signed precompiled ``nvidia-headless-no-dkms-BRANCH-server`` packages, Debian's
    ``nvidia-driver`` versions. Sorted, as strings; empty where the lists offer none.

    .. code:: python

        ["535"]
    """

    default = list

    def command(self) -> str:
        return ("apt-cache pkgnames nvidia-headless-no-dkms- 2>/dev/null; "
                "apt-cache madison nvidia-driver 2>/dev/null | cut -d'|' -f2; true")

    def process(self, output):
        branches = set()
        for line in output:
            if match := re.fullmatch(r"nvidia-headless-no-dkms-([0-9]{3})-server(-open)?|\s*([0-9]{3})\.\S*\s*", line):
                branches.add(match[1] or match[3])
        return sorted(branches)


class DebPackageStates(FactBase):
    """Installed Debian packages with their version and whether they are held
    (``apt-mark hold``), in one ``dpkg-query``.

    .. code:: python

        {"nvidia-driver": {"version": "535.261.03-1", "held": True}}
    """

    default = dict

    def command(self) -> str:
        return "dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\\n'"

    def process(self, output):
        return parse_dpkg_query(output)


def parse_dpkg_query(lines: list[str]) -> dict[str, dict]:
    """``${db:Status-Abbrev} ${Package} ${Version}`` lines: the first letter is the wanted state
    (``h``: hold), the second the actual state (``i``: installed)."""
    packages = {}
    for line in lines:
        if len(line) < 4 or line[1] != "i":
            continue
        name, _, version = line[4:].partition(" ")
        packages[name] = {"version": version.strip(), "held": line[0] == "h"}
    return packages


class ContainerHost(FactBase):
    """Docker on this host: its daemon.json (parsed; ``None`` when absent, ``"invalid"`` when
    not JSON), whether the CDI spec of the NVIDIA GPUs exists, and the image id of one image.

    .. code:: python

        {"daemon_json": {"runtimes": {...}}, "cdi_spec": False, "image_id": "sha256:..." or None}
    """

    def command(self, image: str, cdi_spec: str) -> str:
        return "; ".join([
            f"echo '{SECTION} daemon_json'", "cat /etc/docker/daemon.json 2>/dev/null",
            f"echo '{SECTION} cdi_spec'", f"test -s {quote(cdi_spec)} && echo present",
            f"echo '{SECTION} image'",
            f"command -v docker >/dev/null && docker image inspect --format '{{{{.Id}}}}' {quote(image)} 2>/dev/null",
            "true",
        ])

    def process(self, output):
        sections = split_sections(output)
        text = "\n".join(sections.get("daemon_json", [])).strip()
        try:
            daemon_json = json.loads(text) if text else None
        except ValueError:
            daemon_json = "invalid"
        image = [line for line in sections.get("image", []) if line.startswith("sha256:")]
        return {
            "daemon_json": daemon_json,
            "cdi_spec": "present" in sections.get("cdi_spec", []),
            "image_id": image[0] if image else None,
        }

    def default(self):
        return self.process([])


# --- model weights ---------------------------------------------------------------------------


class ModelWeights(FactBase):
    """One model revision's state on this host: the weights script's host-local state file and
    a stat of every file in the model directory (no hashing), judged here by the script's own
    ``completion``; plus which hub CLIs are installed, the host's SSH host key (the other
    hosts' known_hosts for peer copies), and the lines of root's authorized_keys that hold one
    of ``transfer_marks`` (glmfleet's transfer keys). Shell only: a Python started on every
    host on every run was a quarter of a converged host's CPU per deploy (benchmarks/RESULTS.md).

    .. code:: python

        {"complete": False, "reason": "files changed since verified", "changed": ["model-00003-of-00005.safetensors"],
         "tools": ["/opt/glmfleet/huggingface_hub-2.4.0/bin/hf"], "host_key": "ssh-ed25519 AAAA...",
         "authorized": ['restrict,command="/usr/bin/rrsync -ro /var/lib/glmfleet/models" ssh-ed25519 AAAA... glmfleet-peer-transfer']}
    """

    def command(self, state_file: str, model_dir: str, key: str, tools: list[str], transfer_marks: list[str] = ()) -> str:
        marks = " ".join(f"-e {quote(mark)}" for mark in transfer_marks)
        return "; ".join([
            f"echo '{SECTION} key'", f"echo {quote(key)}",
            f"echo '{SECTION} tools'", f'for tool in {join(tools)}; do test -x "$tool" && echo "$tool"; done',
            f"echo '{SECTION} host_key'",
            f'{{ read -r type key _; [ -n "$key" ] && echo "$type $key"; }} 2>/dev/null < {quote(SSH_HOST_KEY_PUB)}',
            f"echo '{SECTION} authorized'",
            *([f"grep -F {marks} {quote(ROOT_AUTHORIZED_KEYS)} 2>/dev/null"] if transfer_marks else []),
            f"echo '{SECTION} state'", f"cat {quote(state_file)} 2>/dev/null && echo",
            # The script's stat_of: -L follows links as os.stat does (a model dir or files that
            # link into a hub cache); %T@ and %C@ are seconds with nanoseconds (and one digit more).
            f"echo '{SECTION} files'",
            f"find -L {quote(model_dir)} -type f -printf '%P\\t%s\\t%T@\\t%C@\\t%i\\n' 2>/dev/null",
            "true",
        ])

    @staticmethod
    def default():
        return {"complete": False, "reason": "never fetched", "changed": [], "tools": [], "host_key": "", "authorized": []}

    def process(self, output):
        sections = split_sections(output)
        found = {**self.default(), "tools": sections.get("tools", []), "host_key": "".join(sections.get("host_key", [])),
                 "authorized": sections.get("authorized", [])}
        try:
            data = json.loads("\n".join(sections.get("state", [])) or "{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return {**found, "reason": f"unreadable state file: {' '.join(sections['state'])[:200]}"}
        stats = dict(filter(None, map(stat_line, sections.get("files", []))))
        return {**found, **host_script("glmfleet_weights").completion(data, "".join(sections.get("key", [])), stats.get)}


def stat_line(line: str) -> tuple[str, list[int]] | None:
    """``find -printf '%P\\t%s\\t%T@\\t%C@\\t%i'`` as (path, [size, mtime_ns, ctime_ns, inode]);
    None for a line that is not one (part of a file name with a newline: that file counts as gone)."""
    try:
        path, size, mtime, ctime, inode = line.rsplit("\t", 4)
        return path, [int(size), nanoseconds(mtime), nanoseconds(ctime), int(inode)]
    except ValueError:
        return None


def nanoseconds(stamp: str) -> int:
    """``1795343173.4162346820`` (find's %T@) as an exact integer of nanoseconds."""
    seconds, _, fraction = stamp.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))


@functools.cache
def host_script(name: str) -> ModuleType:
    """A script of files/ that runs on the hosts, loaded here for the code the controller shares with it."""
    spec = importlib.util.spec_from_file_location(name, FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# files/vllm_status.py runs inline, so it answers on hosts glmfleet never deployed to.
STATUS_PROGRAM = (FILES / "vllm_status.py").read_text()


def vllm_status_command(*args: str) -> str:
    """A shell command that runs files/vllm_status.py on the host with the system Python."""
    return f"python3 -c {quote(STATUS_PROGRAM)} {join(args)}"


class VllmUnit(FactBase):
    """A vLLM unit file, parsed: what ExecStart serves and where it listens (None if absent).

    .. code:: python

        {"path": "/etc/systemd/system/vllm.service", "sha256": "...", "venv": "vllm-0.22.0-ab12",
         "model": "zai-org/GLM-4-9B-0414", "revision": None, "served_model_name": "zai-org/GLM-4-9B-0414",
         "tensor_parallel_size": 1, "base_url": "http://127.0.0.1:8000", "argv": [...]}
    """

    def command(self, path: str) -> str:
        return vllm_status_command("unit", path)

    def process(self, output):
        return json.loads("\n".join(output))


class VllmStatus(FactBase):
    """Everything `glmfleet status` shows about a host's vLLM, in one round trip: the unit
    parsed (as ``VllmUnit``), the service's systemd state, ``/version``, ``/health``, requests in
    flight from ``/metrics`` (running + waiting), and the GPUs from ``nvidia-smi``.

    .. code:: python

        {"unit": {...} or None, "service": {"ActiveState": "active", "SubState": "running", ...},
         "health": 200 or "why there was no answer", "version": "0.22.0" or None, "in_flight": 0 or None,
         "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 0, ...}] or None,
         "gpu_error": None or "no nvidia-smi"}
    """

    def command(self, path: str) -> str:
        return vllm_status_command("status", path)

    def process(self, output):
        return json.loads("\n".join(output))


# find's %y letters for what roles manage, named as ``stat -c %F`` names them (others stay letters).
FIND_TYPES = {"f": "file", "d": "directory", "l": "symbolic link"}


class ManagedPaths(FactBase):
    """What a role manages on a host, in one command, so that a converged host plans none of
    pyinfra's file, user and service operations (each asks its own facts, a round trip apiece):
    each path's type, owner, group, mode and (regular files) sha256, and its mtime apart; each
    unit's enabled and running state, whether systemd holds an older copy of its file than the
    disk's (``need_reload``), its drop-ins, and when its main process started (unix time, None
    when it runs none); each user's primary group, home and shell. Absent ones are left out.
    With paths, also ``made``: the configured directories glmfleet made (``layout.MADE_DIRS_RECORD``).

    .. code:: python

        {"paths": {"/etc/glmfleet": {"type": "directory", "user": "root", "group": "root", "mode": "700",
                                     "sha256": None},
                   "/etc/glmfleet/vllm.env": {"type": "file", "user": "root", "group": "root", "mode": "600",
                                              "sha256": "9f86d0..."}},
         "mtimes": {"/etc/glmfleet": 1733580000.5, "/etc/glmfleet/vllm.env": 1733580001.25},
         "units": {"vllm.service": {"enabled": True, "running": True, "need_reload": False, "dropins": [],
                                    "started": 1733580002.0}},
         "users": {"vllm": {"group": "vllm", "home": "/var/lib/vllm", "shell": "/usr/sbin/nologin"}},
         "made": ["/var/lib/vllm"]}
    """

    UNIT_PROPERTIES = "UnitFileState,SubState,NeedDaemonReload,DropInPaths,ExecMainStartTimestampMonotonic"

    def command(self, paths: list[str] = (), units: list[str] = (), users: list[str] = ()) -> str:
        # A handful of processes whatever the number of paths: this runs on every host, every run.
        # find -maxdepth 0 reports the paths themselves and never follows a link (a link is not
        # the file wanted there); absent paths are left out. The same find hands the regular
        # files to sha256sum.
        steps = [f"find {join(paths)} -maxdepth 0 -printf 'path\\t%p\\t%y|%u|%g|%m\\t%T@\\n' -type f -exec sha256sum -- {{}} + 2>/dev/null",
                 f"while read -r made; do printf 'made\\t%s\\n' \"$made\"; done < {quote(MADE_DIRS_RECORD)} 2>/dev/null"
                 ] if paths else []
        if units:  # the realtime and monotonic clocks side by side: a start's monotonic time as unix time
            steps.append("read -r uptime _ < /proc/uptime; printf 'clock\\t%s\\t%s\\n' \"$(date +%s.%N)\" \"$uptime\"")
        for unit in units:  # named as asked: systemctl's Id of an alias (sshd.service) is another name
            quoted = quote(unit)
            steps.append(f"printf 'unit\\t%s\\n' {quoted}; systemctl show --property {self.UNIT_PROPERTIES} -- {quoted} 2>/dev/null")
        for user in users:
            quoted = quote(user)
            steps.append(f"printf 'user\\t%s\\t%s\\t%s\\n' {quoted} \"$(getent passwd {quoted})\" \"$(id -gn {quoted} 2>/dev/null)\"")
        return "; ".join([*steps, "true"])

    @staticmethod
    def default():
        return {"paths": {}, "mtimes": {}, "units": {}, "users": {}, "made": []}

    @staticmethod
    def merged(asked: list[dict]) -> dict:
        """One question for several roles' (``ask_together``): every path, unit and user once."""
        return {kind: list(dict.fromkeys(name for kwargs in asked for name in kwargs.get(kind, ())))
                for kind in ("paths", "units", "users")}

    @staticmethod
    def part(answer: dict, paths: list[str] = (), units: list[str] = (), users: list[str] = ()) -> dict:
        """The answer to one role's question, from the merged question's."""
        return {**{kind: {name: answer[kind][name] for name in names if name in answer[kind]}
                   for kind, names in (("paths", paths), ("mtimes", paths), ("units", units), ("users", users))},
                "made": answer["made"]}

    def process(self, output):
        found = self.default()
        digests, unit, offset = {}, None, None
        for line in output:
            if digest := re.fullmatch(r"([0-9a-f]{64})  (.*)", line):  # sha256sum
                digests[digest[2]] = digest[1]
            elif "=" in line and "\t" not in line and unit:  # systemctl show, for the unit named above
                key, _, value = line.partition("=")
                state = found["units"].setdefault(unit, {"enabled": False, "running": False, "need_reload": False,
                                                         "dropins": [], "started": None})
                if key == "UnitFileState":
                    state["enabled"] = value == "enabled"
                elif key == "SubState":
                    state["running"] = value == "running"
                elif key == "NeedDaemonReload":
                    state["need_reload"] = value == "yes"
                elif key == "DropInPaths":
                    state["dropins"] = value.split()
                elif key == "ExecMainStartTimestampMonotonic" and value not in ("", "0") and offset is not None:
                    state["started"] = offset + int(value) / 1e6
            else:
                # The output's trailing whitespace may be trimmed: an empty last field goes with it.
                kind, name, first, second = (line.split("\t") + ["", "", ""])[:4]
                if kind == "unit":
                    unit = name
                elif kind == "clock":
                    offset = float(name) - float(first)  # the realtime clock at monotonic zero
                elif kind == "path":
                    file_type, user, group, mode = first.split("|")
                    found["paths"][name] = {"type": FIND_TYPES.get(file_type, file_type), "user": user, "group": group,
                                            "mode": mode, "sha256": None}
                    found["mtimes"][name] = float(second) if second else None
                elif kind == "user" and first:
                    home, shell = first.split(":")[5:7]
                    found["users"][name] = {"group": second, "home": home, "shell": shell}
                elif kind == "made":
                    found["made"].append(name)
        for path, digest in digests.items():
            if found["paths"].get(path, {}).get("type") == "file":
                found["paths"][path]["sha256"] = digest
        return found

"""The GPU stack as a host has it: GPUs and NVSwitches on the PCI bus, what nvidia-smi says, the
loaded driver and its CUDA version, Secure Boot and signing keys (one fact, ``GpuHost``), and the
driver branches the host's repositories offer."""

from __future__ import annotations

import csv
import re

from pyinfra.api import FactBase

from glmfleet.catalog import GENERATIONS
from glmfleet.facts.output import SECTION, split_sections
from glmfleet.layout import DKMS_SIGNING_KEYS, EFI_SECURE_BOOT_VAR

NVIDIA_VENDOR = "10de"
# PCI class codes (pci.ids "C" list): display controllers that are GPUs, and the bridge class
# NVSwitch reports itself as.
GPU_CLASSES = ("0300", "0302")
NVSWITCH_CLASS = "0680"
# NVIDIA assigns PCI device ids in order of generation: 0x23xx Hopper, 0x26xx-0x28xx Ada,
# 0x29xx and up Blackwell (GB100/GB20x) and later, which only the open kernel modules drive.
FIRST_OPEN_ONLY_DEVICE = 0x2900
# Compute capability (major, minor) -> generation; and, before a driver answers, the PCI device
# id ranges of each generation (NVIDIA numbers its chips in order: GA100 0x20xx, GA10x
# 0x22xx-0x25xx, GH100 0x23xx, AD10x 0x26xx-0x28xx, GB1xx/GB20x from 0x29xx; pci.ids).
COMPUTE_GENERATIONS = ((7, 0, "volta"), (7, 5, "turing"), (8, 0, "ampere"), (8, 9, "ada"), (9, 0, "hopper"))
DEVICE_GENERATIONS = (
    (0x2000, "ampere"),
    (0x2300, "hopper"),
    (0x2400, "ampere"),
    (0x2600, "ada"),
    (0x2900, "blackwell"),
)
SMI_QUERY = "index,name,pci.bus_id,driver_version,memory.total,persistence_mode,compute_cap"


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
        gpus.append(
            {
                "index": int(gpu["index"]),
                "name": gpu["name"],
                "bus_id": gpu["pci.bus_id"],
                "driver_version": gpu["driver_version"],
                "memory_mib": int(gpu["memory.total"]) if gpu["memory.total"].isdigit() else None,
                "persistence_mode": gpu["persistence_mode"] == "Enabled",
                "compute_cap": gpu["compute_cap"],
            }
        )
    return gpus or None


def generation_of_compute_capability(capability: str) -> str | None:
    """``8.0`` -> ampere, ``9.0`` -> hopper, ``10.0`` or ``12.0`` -> blackwell."""
    match = re.fullmatch(r"(\d+)\.(\d+)", capability.strip())
    if not match:
        return None
    major, minor = int(match[1]), int(match[2])
    if major >= 10:
        return "blackwell"
    found = None
    for first_major, first_minor, name in COMPUTE_GENERATIONS:
        if (major, minor) >= (first_major, first_minor):
            found = name
    return found


def generation_of_device(device: str) -> str | None:
    """The generation of a PCI device id (hex, as lspci prints it); None before Ampere."""
    found = None
    for first, name in DEVICE_GENERATIONS:
        if int(device, 16) >= first:
            found = name
    return found


def gpu_generation(gpu: dict) -> str | None:
    """The oldest generation among a host's GPUs (what every rank must run on), from nvidia-smi's
    compute capability, else from the PCI device ids; None without GPUs or when unknown."""
    smi = gpu.get("smi") or []
    found = [generation_of_compute_capability(card["compute_cap"]) for card in smi if card.get("compute_cap")]
    if not found:
        found = [generation_of_device(device["device"]) for device in gpu.get("gpus", [])]
    if not found or None in found:
        return None
    return min(found, key=GENERATIONS.index)


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
        return "; ".join(
            [
                f"echo '{SECTION} os'",
                '. /etc/os-release && echo "$ID|$VERSION_ID|$VERSION_CODENAME"',
                f"echo '{SECTION} arch'",
                "dpkg --print-architecture",
                f"echo '{SECTION} kernel'",
                "read -r kernel < /proc/sys/kernel/osrelease",
                'echo "$kernel"',
                'test -e "/lib/modules/$kernel/build/Makefile" && echo headers',
                f"echo '{SECTION} headers_candidate'",
                *(
                    [
                        'test -e "/lib/modules/$kernel/build/Makefile" || '
                        "LC_ALL=C apt-cache policy linux-headers-\"$kernel\" 2>/dev/null | sed -n 's/^ *Candidate: //p'"
                    ]
                    if headers_candidate
                    else []
                ),
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
                f"echo '{SECTION} module'",
                "cat /proc/driver/nvidia/version 2>/dev/null",
                # A loaded module's /sys/module/NAME/initstate is what lsmod's /proc/modules lists.
                f"echo '{SECTION} modules'",
                "for module in nouveau nvidia; do [ -e /sys/module/$module/initstate ] && echo $module; done",
                f"echo '{SECTION} secure_boot'",
                f"if command -v mokutil >/dev/null; then mokutil --sb-state 2>&1; elif [ -e {EFI_SECURE_BOOT_VAR} ]; then "
                f'echo "efivar $(od -An -t u1 {EFI_SECURE_BOOT_VAR})"; fi',
                f"echo '{SECTION} signing_keys'",
                f"for key in {' '.join(DKMS_SIGNING_KEYS)}; do [ -e $key ] && command -v mokutil >/dev/null && "
                "mokutil --test-key $key 2>&1; done",
                "true",
            ]
        )

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
        return (
            "apt-cache pkgnames nvidia-headless-no-dkms- 2>/dev/null; "
            "apt-cache madison nvidia-driver 2>/dev/null | cut -d'|' -f2; true"
        )

    def process(self, output):
        branches = set()
        for line in output:
            if match := re.fullmatch(r"nvidia-headless-no-dkms-([0-9]{3})-server(-open)?|\s*([0-9]{3})\.\S*\s*", line):
                branches.add(match[1] or match[3])
        return sorted(branches)

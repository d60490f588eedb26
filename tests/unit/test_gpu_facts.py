"""Parsing of what the GPU facts read: real captured output (tests/fixtures/), and the cases no
machine here can produce (NVSwitch, Blackwell, Secure Boot) composed from the tools' documented
formats and marked as such; and the GPU fact's own command, run on a composed sysfs."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from glmfleet.facts.gpu import (
    GpuHost,
    parse_cuda_version,
    parse_driver_module,
    parse_lspci,
    parse_secure_boot,
    parse_smi_query,
)
from glmfleet.facts.packages import parse_dpkg_query
from tests.support.paths import FIXTURES

# nvidia-smi's header from driver 610 on ("Driver Version" and "CUDA Version" renamed), as
# published from a 610.57.04 host.
R610_HEADER = "| NVIDIA-SMI 610.57.04              KMD Version: 610.57.04     CUDA UMD Version: 13.3     |"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def sectioned(**sections: list[str]) -> list[str]:
    """A GpuHost output: each section's lines after its marker, as the fact's command prints them."""
    output = []
    for name, section_lines in sections.items():
        output += [f"::glmfleet:: {name}", *section_lines]
    return output


def test_no_driver_nvidia_smi_output_means_no_gpus_seen():
    # Real: Debian's nvidia-smi on a machine without the module (see fixtures/nodriver/README.md).
    assert parse_smi_query(lines(FIXTURES / "nodriver" / "nvidia-smi-query-gpu.txt")) is None
    assert parse_cuda_version(lines(FIXTURES / "nodriver" / "nvidia-smi.txt")) is None


def test_drivers_from_610_name_the_cuda_version_cuda_umd_version():
    """Drivers from 610 on renamed "CUDA Version" in nvidia-smi's header and in ``nvidia-smi -q``."""
    assert parse_cuda_version([R610_HEADER]) == "13.3"
    assert parse_cuda_version(["    CUDA UMD Version                      : 13.3"]) == "13.3"


def test_host_with_packages_installed_but_no_driver_loaded():
    fact = GpuHost().process(
        sectioned(
            os=["debian|12|bookworm"],
            arch=["amd64"],
            kernel=["6.1.0-28-amd64", "headers"],
            headers_candidate=["6.1.0-28.1"],
            pci=[],
            smi=lines(FIXTURES / "nodriver" / "nvidia-smi-query-gpu.txt"),
            cuda=[],
            module=[],
            modules=[],
            secure_boot=[],
            signing_keys=[],
        )
    )
    assert fact["distro"] == "debian" and fact["distro_version"] == "12" and fact["codename"] == "bookworm"
    assert fact["kernel"] == "6.1.0-28-amd64" and fact["kernel_headers"] is True
    assert fact["kernel_headers_candidate"] == "6.1.0-28.1"
    assert fact["smi"] is None and fact["module"] is None and fact["gpus"] == []
    assert fact["nouveau_loaded"] is False and fact["secure_boot"] is False


# Composed from lspci(8)'s -nn format (`SLOT CLASS [cccc]: VENDOR DEVICE [vvvv:dddd] (rev rr)`),
# as a pci.ids too old to name the device prints it: an HGX H100 board's GPUs (10de:2330) and
# its NVSwitches (class Bridge 0680, 10de:22a3), beside a non-NVIDIA device that must be ignored.
HGX_LSPCI = [
    "18:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2330] (rev a1)",
    "2a:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2330] (rev a1)",
    "05:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)",
    "06:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)",
    "00:1f.0 ISA bridge [0601]: Intel Corporation Device [8086:1b81] (rev 11)",
]


def test_nvswitches_are_counted_apart_from_gpus():
    fact = GpuHost().process(sectioned(pci=HGX_LSPCI))
    assert [gpu["slot"] for gpu in fact["gpus"]] == ["18:00.0", "2a:00.0"]
    assert fact["nvswitches"] == 2
    assert fact["open_modules_required"] is False


def test_sysfs_fallback_without_pciutils():
    # What the fact prints from /sys/bus/pci/devices/*/{class,device} when lspci is missing.
    devices = parse_lspci(["sysfs 0000:18:00.0 0x030200 0x2901", "sysfs 0000:05:00.0 0x068000 0x22a3"])
    assert [(d["class"], d["device"]) for d in devices] == [("0302", "2901"), ("0680", "22a3")]
    fact = GpuHost().process(sectioned(pci=["sysfs 0000:18:00.0 0x030200 0x2901"]))
    assert fact["open_modules_required"] is True  # 0x2901: B200, Blackwell


def test_the_facts_own_command_reads_pci_ids_and_modules_from_sysfs(tmp_path):
    # Composed as the kernel lays sysfs out (one line per attribute file): an H100, an
    # NVSwitch and an Intel bridge; nvidia loaded (its initstate), nouveau present but not a
    # loaded module (built in or only its parameters: no initstate).
    devices, modules = tmp_path / "devices", tmp_path / "module"
    for slot, vendor, pci_class, device in [
        ("0000:18:00.0", "0x10de", "0x030200", "0x2330"),
        ("0000:05:00.0", "0x10de", "0x068000", "0x22a3"),
        ("0000:00:1f.0", "0x8086", "0x060100", "0xa1c8"),
    ]:
        for name, value in (("vendor", vendor), ("class", pci_class), ("device", device)):
            (devices / slot).mkdir(parents=True, exist_ok=True)
            (devices / slot / name).write_text(value + "\n")
    (devices / "0000:18:00.1").mkdir()  # a function whose vendor cannot be opened: no line, none of the last's
    (devices / "0000:18:00.1" / "vendor").symlink_to(tmp_path / "gone")
    (modules / "nvidia").mkdir(parents=True)
    (modules / "nvidia" / "initstate").write_text("live\n")
    (modules / "nouveau").mkdir()
    command = GpuHost().command(headers_candidate=False)
    for real, composed in (
        ("command -v lspci", "false"),  # the sysfs branch, whether or not lspci is here
        ("/sys/bus/pci/devices", str(devices)),
        ("/sys/module", str(modules)),
    ):
        assert real in command
        command = command.replace(real, composed)
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    assert output[output.index("::glmfleet:: pci") + 1 : output.index("::glmfleet:: smi")] == [
        "sysfs 0000:05:00.0 0x068000 0x22a3",
        "sysfs 0000:18:00.0 0x030200 0x2330",
    ]
    assert output[output.index("::glmfleet:: modules") + 1 : output.index("::glmfleet:: secure_boot")] == ["nvidia"]
    fact = GpuHost().process(output)
    assert [(gpu["slot"], gpu["device"]) for gpu in fact["gpus"]] == [("0000:18:00.0", "2330")]
    assert fact["nvswitches"] == 1 and fact["nouveau_loaded"] is False
    (modules / "nouveau" / "initstate").write_text("live\n")
    assert (
        GpuHost().process(
            subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
        )["nouveau_loaded"]
        is True
    )


@pytest.mark.parametrize(("knows_version", "expected"), [(True, "13.0"), (False, "13.3")])
def test_the_facts_own_command_asks_nvidia_smi_version_and_else_its_table(tmp_path, knows_version, expected):
    """An nvidia-smi with --version (its output as captured on the H100) is asked that alone; one
    without it (it refuses the option, as nvidia-smi refuses any it does not know) prints its
    table, here with a 610 driver's header."""
    if knows_version:
        version = (FIXTURES / "h100" / "nvidia-smi-version.txt").read_text()
        asked_version, asked_table = f"printf %s {shlex.quote(version)}", "exit 1"
    else:
        asked_version, asked_table = (
            "echo Invalid combination of input arguments.; exit 2",
            f"echo {shlex.quote(R610_HEADER)}",
        )
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        f"#!/bin/sh\ncase \"$1\" in\n  --version) {asked_version} ;;\n  '') {asked_table} ;;\n  *) exit 9 ;;\nesac\n"
    )
    fake.chmod(0o755)
    output = subprocess.run(
        ["sh", "-c", GpuHost().command(headers_candidate=False)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    ).stdout.splitlines()
    assert GpuHost().process(output)["cuda_version"] == expected


# /proc/driver/nvidia/version's first line, as the proprietary and the open modules word it
# (NVIDIA's open-gpu-kernel-modules README shows the open form).
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.261.03  Wed Jul 30 16:30:56 UTC 2025",
            {"version": "535.261.03", "open": False},
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U16-I1-N07-12-3)",
            {"version": "580.95.05", "open": True},
        ),
    ],
)
def test_loaded_module_version_and_flavour(line, expected):
    assert parse_driver_module([line, "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)"]) == expected


@pytest.mark.parametrize(
    ("output", "enabled"),
    [
        (["SecureBoot enabled"], True),
        (["SecureBoot disabled"], False),
        (["This system doesn't support Secure Boot"], False),
        (["EFI variables are not supported on this system"], False),
        (["efivar    6   0   0   0   1"], True),  # od -An -t u1: 4 attribute bytes, then the value
        (["efivar    6   0   0   0   0"], False),
        ([], False),
    ],
)
def test_secure_boot_state(output, enabled):
    assert parse_secure_boot(output) is enabled


def test_enrolled_signing_key_is_seen():
    fact = GpuHost().process(sectioned(signing_keys=["/var/lib/dkms/mok.pub is already enrolled"]))
    assert fact["signing_key_enrolled"] is True
    assert (
        GpuHost().process(sectioned(signing_keys=["/var/lib/dkms/mok.pub is not enrolled"]))["signing_key_enrolled"]
        is False
    )


def test_dpkg_query_states():
    packages = parse_dpkg_query(
        [
            "ii  bash 5.2.15-2+b8",
            "hi  nvidia-driver 535.261.03-1",
            "rc  nvidia-kernel-dkms 535.216.01-1",  # removed, configuration left: not installed
            "un  nvidia-open-kernel-dkms ",
        ]
    )
    assert packages == {
        "bash": {"version": "5.2.15-2+b8", "held": False},
        "nvidia-driver": {"version": "535.261.03-1", "held": True},
    }

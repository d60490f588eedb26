"""The GPU facts on real output captured on an H100 machine (tests/fixtures/h100/, from the gpu
branch). Skipped, saying which files are missing, until those captures are in this tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmfleet.facts import GpuHost

H100 = Path(__file__).parent / "fixtures" / "h100"
# file -> the command that produced it
CAPTURES = {
    "lspci-nn.txt": "lspci -nn",
    "nvidia-smi-query-gpu.txt": "nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,"
                                "persistence_mode,compute_cap --format=csv,noheader,nounits",
    "nvidia-smi.txt": "nvidia-smi",
    "proc-driver-nvidia-version.txt": "cat /proc/driver/nvidia/version",
}
missing = [name for name in CAPTURES if not (H100 / name).is_file()]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"H100 captures not in tests/fixtures/h100: {missing}")


def capture(name: str) -> list[str]:
    return (H100 / name).read_text().splitlines()


def test_h100_captures_parse_into_one_consistent_picture():
    fact = GpuHost().process([
        "::glmfleet:: pci", *capture("lspci-nn.txt"),
        "::glmfleet:: smi", *capture("nvidia-smi-query-gpu.txt"),
        "::glmfleet:: cuda", *capture("nvidia-smi.txt"),
        "::glmfleet:: module", *capture("proc-driver-nvidia-version.txt"),
    ])
    gpus, smi = fact["gpus"], fact["smi"]
    assert gpus and smi and len(gpus) == len(smi)  # the PCI bus and the driver see the same GPUs
    assert all(int(gpu["device"], 16) >> 8 == 0x23 for gpu in gpus)  # 0x23xx: Hopper (GH100)
    assert all("H100" in gpu["name"] and gpu["memory_mib"] > 70000 for gpu in smi)
    assert {gpu["driver_version"] for gpu in smi} == {fact["module"]["version"]}
    assert fact["cuda_version"] and float(fact["cuda_version"]) >= 12.0
    assert fact["open_modules_required"] is False  # Hopper runs either module flavour

"""The GPU facts on real output captured on an H100 machine (tests/fixtures/h100/, see its
README.md). That machine has no lspci, so the PCI view is the fact's own sysfs branch, as
captured by running ``GpuHost().command()`` there (gpuhost-fact.txt)."""

from __future__ import annotations

from glmfleet.facts.gpu import GpuHost, parse_cuda_version
from glmfleet.facts.output import SECTION
from tests.support.paths import FIXTURES

H100 = FIXTURES / "h100"


def capture(name: str) -> list[str]:
    return (H100 / name).read_text().splitlines()


def section(lines: list[str], name: str) -> list[str]:
    """The lines of one ``::glmfleet:: NAME`` section of the fact's output."""
    out, inside = [], False
    for line in lines:
        if line.startswith(SECTION):
            inside = line == f"{SECTION} {name}"
        elif inside:
            out.append(line)
    return out


def test_the_facts_own_output_on_an_h100_is_one_hopper_gpu_on_an_open_module():
    fact = GpuHost().process(capture("gpuhost-fact.txt"))
    assert (fact["distro"], fact["distro_version"], fact["arch"]) == ("ubuntu", "24.04", "amd64")
    assert fact["kernel"] == capture("uname-r.txt")[0]
    assert [(gpu["slot"], gpu["class"], gpu["device"]) for gpu in fact["gpus"]] == [("0000:00:06.0", "0302", "2330")]
    assert fact["nvswitches"] == 0
    [smi] = fact["smi"]
    assert (smi["name"], smi["memory_mib"], smi["compute_cap"]) == ("NVIDIA H100 80GB HBM3", 81559, "9.0")
    assert smi["bus_id"].lower().endswith(fact["gpus"][0]["slot"])  # the driver's GPU is the bus's GPU
    assert fact["module"] == {"version": smi["driver_version"], "open": True}
    assert fact["cuda_version"] == "13.0"
    assert fact["open_modules_required"] is False  # Hopper runs either module flavour
    assert fact["nouveau_loaded"] is False
    assert fact["secure_boot"] is False  # neither mokutil nor the EFI variable exists there


def test_separate_captures_parse_into_the_same_picture_as_the_fact():
    fact = GpuHost().process(capture("gpuhost-fact.txt"))
    separate = GpuHost().process(
        [
            f"{SECTION} pci",
            *section(capture("gpuhost-fact.txt"), "pci"),
            f"{SECTION} smi",
            *capture("nvidia-smi-query-gpu.txt"),
            f"{SECTION} cuda",
            *capture("nvidia-smi.txt"),
            f"{SECTION} module",
            *capture("proc-driver-nvidia-version.txt"),
        ]
    )
    for key in ("gpus", "smi", "cuda_version", "module", "open_modules_required"):
        assert separate[key] == fact[key], key


def test_the_drivers_cuda_version_reads_the_same_from_every_nvidia_smi_output():
    """The fact asks ``nvidia-smi --version``; the status table's header and ``-q`` say the same."""
    for name in ("nvidia-smi-version.txt", "nvidia-smi.txt", "nvidia-smi-q.txt"):
        assert parse_cuda_version(capture(name)) == "13.0", name


def test_sysfs_listing_agrees_with_the_facts_pci_section():
    """sys-bus-pci.txt (every device's vendor, device, class) was read independently of the fact."""
    nvidia = [line.split() for line in capture("sys-bus-pci.txt") if "vendor=0x10de" in line]
    assert [(slot, device, pci_class) for slot, _, device, pci_class in nvidia] == [
        ("0000:00:06.0", "device=0x2330", "class=0x030200")
    ]
    assert section(capture("gpuhost-fact.txt"), "pci") == ["sysfs 0000:00:06.0 0x030200 0x2330"]


def test_the_h100s_generation_reads_the_same_from_the_driver_and_from_the_pci_bus():
    from glmfleet.facts.gpu import gpu_generation

    fact = GpuHost().process(capture("gpuhost-fact.txt"))
    assert gpu_generation(fact) == "hopper"  # compute capability 9.0
    assert gpu_generation({**fact, "smi": None}) == "hopper"  # before a driver answers: device 0x2330

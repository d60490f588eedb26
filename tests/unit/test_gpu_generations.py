"""A host's GPU generation, which the catalog's rules read: from nvidia-smi's compute capability
(real H100 and H200 output in tests/fixtures; the A100 and B200 rows in nvidia-smi's documented
``--query-gpu`` CSV format), else from the PCI device id (pci.ids: 10de:20b2 A100 SXM4 80GB,
10de:2330 H100 SXM5, 10de:2335 H200, 10de:26b9 L40S, 10de:2901 B200)."""

from __future__ import annotations

import pytest

from glmfleet.facts.gpu import gpu_generation, parse_smi_query
from tests.support.paths import FIXTURES

A100 = "0, NVIDIA A100-SXM4-80GB, 00000000:07:00.0, 550.54.15, 81920, Enabled, 8.0"
L40S = "0, NVIDIA L40S, 00000000:41:00.0, 570.86.15, 46068, Enabled, 8.9"
B200 = "0, NVIDIA B200, 00000000:1B:00.0, 570.124.06, 183359, Enabled, 10.0"


def smi_of(*rows: str) -> dict:
    return {"smi": parse_smi_query(list(rows)), "gpus": []}


@pytest.mark.parametrize(
    ("rows", "generation"),
    [
        ((FIXTURES / "h100" / "nvidia-smi-query-gpu.txt").read_text().splitlines(), "hopper"),
        ((FIXTURES / "h200" / "nvidia-smi-query-gpu.txt").read_text().splitlines(), "hopper"),
        ([A100], "ampere"),
        ([L40S], "ada"),
        ([B200], "blackwell"),
        # a host mixing generations runs a replica at the pace, and with the kernels, of its oldest
        ([B200, A100], "ampere"),
    ],
)
def test_the_generation_follows_the_compute_capability(rows, generation):
    assert gpu_generation(smi_of(*rows)) == generation


@pytest.mark.parametrize(
    ("device", "generation"),
    [
        ("20b2", "ampere"),
        ("2236", "ampere"),
        ("2330", "hopper"),
        ("2335", "hopper"),
        ("26b9", "ada"),
        ("2901", "blackwell"),
    ],
)
def test_before_a_driver_answers_the_pci_device_id_tells(device, generation):
    fact = {"smi": None, "gpus": [{"slot": "07:00.0", "class": "0302", "device": device, "name": None}]}
    assert gpu_generation(fact) == generation


def test_an_older_or_unknown_gpu_tells_no_generation_and_so_no_rule_applies():
    assert gpu_generation({"smi": None, "gpus": [{"device": "1eb8"}]}) is None  # T4 (Turing, 0x1eb8)
    assert gpu_generation({"smi": None, "gpus": []}) is None

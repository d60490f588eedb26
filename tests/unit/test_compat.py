"""Every compatibility and capacity rule, on both sides of its boundary, from tables.

Data-only rules go through config.resolve, as a deploy runs them before connecting; host
rules call compat.host_problems with the plain values a host's facts give.
"""

from __future__ import annotations

import pytest

from glmfleet import catalog, compat
from glmfleet.config import ConfigError, all_settings, resolve, values

REAL = {"vllm_package": "vllm"}
TEST_DOUBLE = {"vllm_package": "vllm-test-double", "vllm_version": "0.1.0"}


def problems_of(data: dict) -> str:
    """The error a deploy would stop with, or '' when the data passes."""
    try:
        resolve({**REAL, **data}, "gpu-1")
    except ConfigError as error:
        return str(error)
    return ""


# (data, words of the error, or None where the data must pass)
DATA_RULES = [
    # model against the vLLM release
    (
        {"model": "glm-4.5", "vllm_version": "0.10.0"},
        "model = 'zai-org/GLM-4.5' (Glm4MoeForCausalLM) needs vLLM 0.10.1 or later; vllm_version = '0.10.0': set vllm_version to 0.10.1 or later",
    ),
    ({"model": "glm-4.5", "vllm_version": "0.10.1"}, None),
    ({"model": "glm-4-9b-0414", "vllm_version": "0.8.3"}, "needs vLLM 0.8.4 or later; vllm_version = '0.8.3'"),
    ({"model": "glm-4-9b-0414", "vllm_version": "0.8.4"}, None),
    ({"model": "glm-4.7-flash", "vllm_version": "0.14.1"}, "needs vLLM 0.15.0 or later"),
    # parser names the pinned vLLM does not have
    (
        {"model": "x/y", "vllm_version": "0.13.0", "vllm_tool_call_parser": "glm47"},
        "vllm_tool_call_parser = 'glm47' first ships in vLLM 0.14.0; vllm_version = '0.13.0': set vllm_version to 0.14.0 or later",
    ),
    ({"model": "x/y", "vllm_version": "0.14.0", "vllm_tool_call_parser": "glm47"}, None),
    (
        {"model": "x/y", "vllm_version": "0.10.0", "vllm_tool_call_parser": "glm45"},
        "vllm_tool_call_parser = 'glm45' first ships in vLLM 0.10.1",
    ),
    ({"model": "x/y", "vllm_version": "0.10.1", "vllm_tool_call_parser": "glm45"}, None),
    (
        {"model": "x/y", "vllm_version": "0.10.0", "vllm_reasoning_parser": "glm45"},
        "vllm_reasoning_parser = 'glm45' first ships in vLLM 0.10.1",
    ),
    ({"model": "x/y", "vllm_version": "0.10.1", "vllm_reasoning_parser": "glm45"}, None),
    # VLLM_USE_V1=0 where V0 no longer exists
    (
        {"model": "x/y", "vllm_version": "0.11.0", "vllm_env": {"VLLM_USE_V1": "0"}},
        "vllm_env sets VLLM_USE_V1='0', but vLLM 0.11.0 has no V0 engine (removed in 0.11.0): remove VLLM_USE_V1 from vllm_env",
    ),
    ({"model": "x/y", "vllm_version": "0.10.2", "vllm_env": {"VLLM_USE_V1": "0"}}, None),
    ({"model": "x/y", "vllm_version": "0.11.0", "vllm_env": {"VLLM_USE_V1": "1"}}, None),
    # tensor parallel size against attention heads
    (
        {"model": "glm-4.7-flash", "vllm_tensor_parallel_size": 8},
        "vllm_tensor_parallel_size = 8 does not divide the 20 attention heads of 'zai-org/GLM-4.7-Flash': use one of [1, 2, 4, 5, 10, 20]",
    ),
    ({"model": "glm-4.7-flash", "vllm_tensor_parallel_size": 4}, None),
    ({"model": "glm-4.5", "vllm_tensor_parallel_size": 5}, "does not divide the 96 attention heads"),
    ({"model": "glm-4.5", "vllm_tensor_parallel_size": 8}, None),
    # companions: what the model needs against the pin and against vLLM's own bound
    (
        {"model": "glm-4.7-flash", "vllm_extra_packages": ["transformers==4.57.6"]},
        "model = 'zai-org/GLM-4.7-Flash' needs transformers>=5; vllm_extra_packages pins transformers==4.57.6: pin a version that matches >=5",
    ),
    ({"model": "glm-4.7-flash", "vllm_version": "0.22.0", "vllm_extra_packages": ["transformers==5.23.0"]}, None),
    (
        {"model": "glm-4.7-flash", "vllm_extra_packages": ["transformers==5.23.0"]},
        "pins transformers==5.23.0, which vLLM 0.33.0 refuses (its wheel requires transformers<5.21.0,>=5.16.1)",
    ),
    (
        {"model": "glm-5.2", "vllm_extra_packages": ["transformers==5.8.0"]},
        "model = 'zai-org/GLM-5.2' needs transformers>=5.9.0; vllm_extra_packages pins transformers==5.8.0",
    ),
    ({"model": "glm-5.2", "vllm_extra_packages": ["transformers==5.20.2"]}, None),
    # the 2026 models: the release each needs, releases that cannot be installed, new keys
    ({"model": "glm-5.1"}, None),
    (
        {"model": "glm-5.1", "vllm_version": "0.19.0"},
        "model = 'zai-org/GLM-5.1' (GlmMoeDsaForCausalLM) needs vLLM 0.19.1 or later",
    ),
    ({"model": "glm-5.3", "vllm_version": "0.31.0"}, "needs vLLM 0.32.0 or later; vllm_version = '0.31.0'"),
    ({"model": "glm-5.3", "vllm_version": "0.32.0"}, None),
    ({"model": "glm-5.3-flash", "vllm_version": "0.29.0"}, "(Glm5NextForConditionalGeneration) needs vLLM 0.30.0"),
    (
        {"model": "glm-5.1", "vllm_version": "0.34.0"},
        "vllm_version = '0.34.0' cannot be installed: its wheel pins flashinfer-python==0.7.3, which PyPI does not "
        "offer (0.7.2.post1 and 0.7.4 only, checked 2026-12-07): no index resolves it; set vllm_version to 0.33.0",
    ),
    (
        {"model": "x/y", "vllm_version": "0.23.0", "vllm_reasoning_parser": "glm47"},
        "vllm_reasoning_parser = 'glm47' first ships in vLLM 0.24.0",
    ),
    ({"model": "x/y", "vllm_version": "0.24.0", "vllm_reasoning_parser": "glm47"}, None),
    (
        {"model": "x/y", "vllm_version": "0.13.0", "vllm_engine_ready_timeout": 3600},
        "vllm_engine_ready_timeout = 3600 needs vLLM 0.14.0 or later (VLLM_ENGINE_READY_TIMEOUT_S)",
    ),
    ({"model": "x/y", "vllm_version": "0.14.0", "vllm_engine_ready_timeout": 3600}, None),
    (
        {"model": "x/y", "vllm_extra_args": ["--speculative_config.method=mtp"]},
        "vllm_extra_args contains '--speculative_config.method' (vLLM reads it as '--speculative-config'); "
        "set vllm_speculative_config instead",
    ),
    ({"model": "x/y", "vllm_extra_args": ["--kv-cache-dtype", "fp8"]}, "set vllm_kv_cache_dtype instead"),
    ({"model": "x/y", "vllm_extra_args": ["-dp", "2"]}, "set vllm_data_parallel_size instead"),
    (
        {"model": "glm-4.7-flash", "vllm_version": "0.19.0"},
        "needs transformers>=5, which vLLM 0.19.0 refuses (its wheel requires transformers<5): set vllm_version to 0.19.1 or later",
    ),
    ({"model": "glm-4.7-flash", "vllm_version": "0.19.1"}, None),
    (
        {"model": "x/y", "vllm_version": "0.15.1", "vllm_extra_packages": ["transformers==5.0.0"]},
        "vllm_extra_packages pins transformers==5.0.0, which vLLM 0.15.1 refuses (its wheel requires transformers<5)",
    ),
    ({"model": "x/y", "vllm_version": "0.15.1", "vllm_extra_packages": ["transformers==4.57.6"]}, None),
    # the model's own code, and auto tool choice without a parser
    (
        {"model": "glm-4-9b-chat", "vllm_trust_remote_code": False},
        "model = 'zai-org/glm-4-9b-chat' runs its own Python code from its repo; vllm_trust_remote_code = False: set vllm_trust_remote_code to true",
    ),
    ({"model": "glm-4-9b-chat"}, None),
    (
        {"model": "x/y", "vllm_enable_auto_tool_choice": True},
        "vllm_enable_auto_tool_choice = True needs vllm_tool_call_parser",
    ),
    ({"model": "x/y", "vllm_enable_auto_tool_choice": True, "vllm_tool_call_parser": "hermes"}, None),
]


@pytest.mark.parametrize(("data", "words"), DATA_RULES)
def test_data_rules_stop_the_run_naming_host_setting_value_and_fix(data, words):
    message = problems_of(data)
    if words is None:
        assert message == ""
    else:
        assert any(line.startswith("  gpu-1: ") and words in line for line in message.splitlines()), message
        assert "no host was changed" in message


def test_version_rules_do_not_apply_to_a_stand_in_package():
    assert resolve({**TEST_DOUBLE, "model": "glm-4.5", "vllm_env": {"VLLM_USE_V1": "0"}})


def cfg_of(data: dict) -> dict:
    return values({**REAL, **data}, all_settings())


WARNING_RULES = [
    (
        {"model": "glm-4-32b-0414", "vllm_tool_call_parser": "hermes"},
        "vllm_tool_call_parser = 'hermes' on 'zai-org/GLM-4-32B-0414': hermes parses <tool_call> JSON blocks",
    ),
    ({"model": "glm-4-32b-0414"}, None),
    ({"model": "glm-4.5", "vllm_tool_call_parser": "hermes"}, None),
    (
        {"model": "glm-4-9b-chat-hf", "vllm_version": "0.8.4", "vllm_extra_packages": ["transformers==4.51.3"]},
        "on vllm_version = '0.8.4': vLLM before 0.8.5 applies GLM's rotary embedding wrongly",
    ),
    ({"model": "glm-4-9b-chat-hf", "vllm_version": "0.8.5", "vllm_extra_packages": ["transformers==4.51.3"]}, None),
    (
        {"model": "x/y", "vllm_version": "0.11.0"},
        "vllm_version = '0.11.0': this vLLM's wheel sets no upper bound on transformers",
    ),
    ({"model": "x/y", "vllm_version": "0.11.0", "vllm_extra_packages": ["transformers==4.56.2"]}, None),
    ({"model": "x/y", "vllm_version": "0.12.0"}, None),
    # variables a release no longer reads
    (
        {"model": "x/y", "vllm_version": "0.24.0", "vllm_env": {"VLLM_USE_FLASHINFER_MOE_FP4": "1"}},
        "vllm_env sets VLLM_USE_FLASHINFER_MOE_FP4, which vLLM 0.24.0 no longer reads (gone since 0.24.0)",
    ),
    ({"model": "x/y", "vllm_version": "0.23.0", "vllm_env": {"VLLM_USE_FLASHINFER_MOE_FP4": "1"}}, None),
    (
        {"model": "x/y", "vllm_version": "0.22.0", "vllm_env": {"VLLM_USE_V1": "1"}},
        "vllm_env sets VLLM_USE_V1, which vLLM 0.22.0 no longer reads (gone since 0.11.1): it does nothing",
    ),
    (
        {
            "model": "x/y",
            "vllm_version": "0.11.0",
            "vllm_env": {"VLLM_USE_V1": "1"},
            "vllm_extra_packages": ["transformers==4.56.2"],
        },
        None,
    ),
]


@pytest.mark.parametrize(("data", "words"), WARNING_RULES)
def test_known_bad_combinations_warn_and_say_why(data, words):
    warnings = compat.combination_warnings(cfg_of(data))
    if words is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and words in warnings[0], warnings


GIB_MIB = 1024
HOST_RULES = [
    # tensor x pipeline parallel size against the host's GPUs
    (
        {"vllm_tensor_parallel_size": 2, "vllm_pipeline_parallel_size": 2},
        {"gpu_count": 3},
        "vllm_tensor_parallel_size = 2 × vllm_pipeline_parallel_size = 2 needs 4 GPUs, the host has 3: lower them",
    ),
    ({"vllm_tensor_parallel_size": 2, "vllm_pipeline_parallel_size": 2}, {"gpu_count": 4}, None),
    # weights per GPU plus a KV cache for one full sequence against utilization x memory
    (
        {"model": "glm-4.5-air", "vllm_tensor_parallel_size": 2},
        {"gpu_memory_mib": 80 * GIB_MIB},
        # 205.8 GiB / 2; 46 layers x 4 of 8 KV heads x 128 x (K, V) x 2 bytes x 131072 tokens = 11.5 GiB
        "'zai-org/GLM-4.5-Air' (206 GiB of bf16 weights) needs about 115.4 GiB per GPU (weights 102.9, KV cache for "
        "one 131072-token sequence 11.5, reserve 1) with vllm_tensor_parallel_size = 2, but "
        "vllm_gpu_memory_utilization = 0.9 of 80.0 GiB leaves 72.0 GiB: set vllm_tensor_parallel_size to 4",
    ),
    ({"model": "glm-4.5-air", "vllm_tensor_parallel_size": 4}, {"gpu_memory_mib": 80 * GIB_MIB}, None),
    (
        {"model": "glm-4.5-air", "vllm_tensor_parallel_size": 2, "vllm_pipeline_parallel_size": 2},
        {"gpu_memory_mib": 80 * GIB_MIB},
        None,
    ),
    (
        {"model": "glm-4-32b-0414", "vllm_gpu_memory_utilization": 0.75},
        {"gpu_memory_mib": 80 * GIB_MIB},
        "leaves 60.0 GiB: set vllm_tensor_parallel_size to 2, raise vllm_gpu_memory_utilization",
    ),
    # GLM-5-FP8 (744 B parameters, one byte each; 78 layers x one 576-wide latent x 2 bytes x 202752 tokens)
    (
        {"model": "glm-5-fp8", "vllm_tensor_parallel_size": 8},
        {"gpu_count": 8, "gpu_memory_mib": 80 * GIB_MIB, "gpu_generation": "hopper"},
        "'zai-org/GLM-5-FP8' (693 GiB of fp8 weights) needs about 104.6 GiB per GPU (weights 86.6, KV cache for one "
        "202752-token sequence 17.0, reserve 1) with vllm_tensor_parallel_size = 8, but vllm_gpu_memory_utilization "
        "= 0.9 of 80.0 GiB leaves 72.0 GiB: use 8 GPUs of at least 116 GiB in one host, or span 2 hosts of 8 such "
        "GPUs with one replica group",
    ),
    (
        {"model": "glm-5-fp8", "vllm_tensor_parallel_size": 8},
        {"gpu_count": 8, "gpu_memory_mib": 141 * GIB_MIB, "gpu_generation": "hopper"},
        None,
    ),
    # data parallel copies the model; with expert parallel its experts spread over every copy
    (
        {"model": "glm-5-fp8", "vllm_data_parallel_size": 8, "vllm_enable_expert_parallel": False},
        {"gpu_count": 8, "gpu_memory_mib": 141 * GIB_MIB},
        "needs about 710.9 GiB per GPU (weights 692.9, KV cache for one 202752-token sequence 17.0, reserve 1) "
        "with vllm_tensor_parallel_size = 1, vllm_data_parallel_size = 8, but vllm_gpu_memory_utilization = 0.9 of "
        "141.0 GiB leaves 126.9 GiB: set vllm_enable_expert_parallel to true",
    ),
    (
        {"model": "glm-5-fp8", "vllm_data_parallel_size": 8, "vllm_enable_expert_parallel": True},
        {"gpu_count": 8, "gpu_memory_mib": 141 * GIB_MIB},
        None,
    ),
    (
        {"vllm_tensor_parallel_size": 2, "vllm_data_parallel_size": 4},
        {"gpu_count": 4},
        "vllm_tensor_parallel_size = 2 × vllm_pipeline_parallel_size = 1 × vllm_data_parallel_size = 4 needs 8 GPUs, the host has 4",
    ),
    # GPU generations: FP8 weights need Ada or later, the DSA models Hopper or Blackwell
    (
        {"model": "glm-4.5-air-fp8", "vllm_tensor_parallel_size": 2},
        {"gpu_generation": "ampere"},
        "model = 'zai-org/GLM-4.5-Air-FP8' is an FP8 checkpoint, and this host's GPUs (Ampere) have no FP8: serve "
        "'glm-4.5-air' (zai-org/GLM-4.5-Air) instead, or use Ada, Hopper or Blackwell GPUs",
    ),
    ({"model": "glm-4.5-air-fp8"}, {"gpu_generation": "ada"}, None),
    ({"model": "glm-4.5-air"}, {"gpu_generation": "ampere"}, None),
    (
        {"model": "glm-5"},
        {"gpu_generation": "ampere"},
        "model = 'zai-org/GLM-5' (GlmMoeDsaForCausalLM) runs on vLLM kernels for Hopper or Blackwell GPUs only; this "
        "host's are Ampere",
    ),
    ({"model": "glm-5"}, {"gpu_generation": "ada"}, "runs on vLLM kernels for Hopper or Blackwell GPUs only"),
    ({"model": "glm-5"}, {"gpu_generation": "blackwell"}, None),
    ({"model": "glm-5"}, {"gpu_generation": "hopper"}, None),
    ({"model": "glm-4-32b-0414", "vllm_gpu_memory_utilization": 0.9}, {"gpu_memory_mib": 80 * GIB_MIB}, None),
    ({"model": "glm-4-9b-chat"}, {"gpu_memory_mib": 24 * GIB_MIB}, "KV cache for one 131072-token sequence 5.0"),
    ({"model": "glm-4-9b-chat", "vllm_max_model_len": 8192}, {"gpu_memory_mib": 24 * GIB_MIB}, None),
    ({"model": "x/unknown-size"}, {"gpu_memory_mib": 1 * GIB_MIB}, None),
    # the driver's CUDA version against the CUDA of the torch the pinned vLLM runs
    (
        {"vllm_version": "0.22.0"},
        {"driver_cuda_version": "12.8"},
        "the driver supports CUDA 12.8, but vllm_version = '0.22.0' runs torch built for CUDA 13.0: install a driver for CUDA 13.x",
    ),
    ({"vllm_version": "0.22.0"}, {"driver_cuda_version": "13.0"}, None),
    ({"vllm_version": "0.19.1"}, {"driver_cuda_version": "12.2"}, None),  # minor-version compatibility: a warning
    ({"vllm_version": "0.8.4"}, {"driver_cuda_version": "11.8"}, "runs torch built for CUDA 12.4"),
    # the port vLLM will listen on
    (
        {"vllm_port": 8000},
        {"listeners": [(22, "ssh.service"), (8000, None)]},
        "vllm_port = 8000 is already in use by a process outside any systemd service: set vllm_port to a free port",
    ),
    (
        {"vllm_port": 8000},
        {"listeners": [(8000, "nginx.service")]},
        "vllm_port = 8000 is already in use by nginx.service",
    ),
    ({"vllm_port": 8000}, {"listeners": [(8000, "vllm.service"), (8001, None)]}, None),
    ({"vllm_port": 8000}, {"listeners": []}, None),
]


@pytest.mark.parametrize(("data", "facts", "words"), HOST_RULES)
def test_host_rules_name_setting_value_and_fix(data, facts, words):
    found = compat.host_problems(cfg_of(data), **facts)
    if words is None:
        assert found == []
    else:
        assert len(found) == 1 and words in found[0], found


@pytest.mark.parametrize(
    ("version", "driver", "warns"),
    [("0.19.1", "12.2", True), ("0.19.1", "12.8", False), ("0.22.0", "12.8", False), ("0.22.0", "13.1", False)],
)
def test_an_older_driver_of_the_same_cuda_major_warns(version, driver, warns):
    warnings = compat.host_warnings(cfg_of({"vllm_version": version}), driver_cuda_version=driver)
    assert bool(warnings) == warns
    if warns:
        assert "minor-version compatibility" in warnings[0] and "upgrade the driver to one for CUDA 12.8" in warnings[0]


def test_host_facts_that_are_unknown_are_not_guessed():
    assert compat.host_problems(cfg_of({"model": "glm-4.5", "vllm_tensor_parallel_size": 8})) == []


@pytest.mark.parametrize(
    ("version", "cuda"),
    [
        ("0.8.4", "12.4"),
        ("0.8.5", "12.4"),
        ("0.9.0", "12.6"),
        ("0.10.1", "12.6"),
        ("0.10.2", "12.8"),
        ("0.19.1", "12.8"),
        ("0.20.0", "13.0"),
        ("0.22.0", "13.0"),
    ],
)
def test_cuda_runtime_of_each_release_follows_the_measured_table(version, cuda):
    from packaging.version import Version

    assert catalog.vllm_facts().cuda_runtime_for(Version(version)) == Version(cuda)

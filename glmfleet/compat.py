"""Compatibility and capacity checks: will this model, this vLLM release, these flags and this
host work together? Answered from data before any host is touched, not after a ten-minute
model load ends in a traceback.

Pure functions of plain values, so tests drive every rule from a table:

- :func:`combination_problems` / :func:`combination_warnings` need only the configuration
  (config.py runs the problems before connecting; roles/preflight.py logs the warnings);
- :func:`host_problems` / :func:`host_warnings` also need what the host reports (GPU count and
  memory, the driver's CUDA version, who listens on which port); roles/preflight.py calls them
  while planning, so a host that cannot serve fails before anything on it changes.

Every message names the setting, its value and the fix; the caller prefixes the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from glmfleet import catalog

# Beyond weights and KV cache, vLLM needs memory for the CUDA context, activations and CUDA
# graphs. A deliberately low floor: the check refuses what cannot fit, not what might be tight.
RESERVE_GIB = 1.0
TP_SIZES = (1, 2, 4, 8)  # tensor parallel sizes on one host
# vLLM 0.8.4 first shipped glm4.py (the GLM-4-0414 models), broken; fixed upstream by vLLM PR
# #16618 in 0.8.5. roles/glm4_patch.py patches it; the image runtime lays the patched copy over.
GLM4_BROKEN_IN = "0.8.4"


def needs_glm4_patch(cfg: Mapping[str, Any]) -> bool:
    return cfg["vllm_package"] == "vllm" and cfg["vllm_version"] == GLM4_BROKEN_IN


def vllm_release(cfg: Mapping[str, Any]) -> Version | None:
    """The vLLM release the host will run; None for a stand-in package (the test double),
    whose version says nothing about vLLM's releases."""
    return Version(cfg["vllm_version"]) if cfg["vllm_package"] == "vllm" else None


def pinned(cfg: Mapping[str, Any], package: str) -> Version | None:
    """The version vllm_extra_packages pins for a package, if any."""
    for pin in cfg["vllm_extra_packages"]:
        if catalog.package_name(pin) == catalog.package_name(package):
            return Version(pin.partition("==")[2])
    return None


def could_meet(need: SpecifierSet, allowed: SpecifierSet) -> bool:
    """Whether some version meets both: tried on every version either names and the next patch,
    minor and major release after each (enough for bounds, exclusions and wildcards)."""
    named = [Version(spec.version.removesuffix(".*")) for spec in (*need, *allowed)] or [Version("0")]
    candidates = set()
    for version in named:
        major, minor, patch = (*version.release, 0, 0)[:3]
        candidates |= {
            version,
            Version(f"{major}.{minor}.{patch + 1}"),
            Version(f"{major}.{minor + 1}.0"),
            Version(f"{major + 1}.0.0"),
        }
    return any(version in need and version in allowed for version in candidates)


def combination_problems(cfg: Mapping[str, Any]) -> list[str]:
    """What cannot work, from the configuration alone."""
    entry = catalog.find(cfg["model"])
    release = vllm_release(cfg)
    found: list[str] = []
    if release is not None:
        found += release_problems(cfg, entry, release)
    if entry is not None:
        found += model_problems(cfg, entry)
    if cfg["vllm_enable_auto_tool_choice"] and not cfg["vllm_tool_call_parser"]:
        found.append(
            "vllm_enable_auto_tool_choice = True needs vllm_tool_call_parser: set the parser for the model's tool-call format"
        )
    return found


def release_problems(cfg: Mapping[str, Any], entry: catalog.Model | None, release: Version) -> list[str]:
    facts = catalog.vllm_facts()
    found = []
    version = cfg["vllm_version"]
    if release in facts.broken:
        found.append(
            f"vllm_version = {version!r} cannot be installed: {facts.broken[release]}; set vllm_version to "
            + (
                f"{entry.vllm_checked}, the release glmfleet checked {cfg['model']!r} with"
                if entry
                else "another release"
            )
        )
    if entry is not None and release < entry.vllm_min:
        found.append(
            f"model = {cfg['model']!r} ({entry.architecture}) needs vLLM {entry.vllm_min} or later; "
            f"vllm_version = {version!r}: set vllm_version to {entry.vllm_min} or later"
        )
    if entry is not None and entry.vllm_max is not None and release > entry.vllm_max:
        found.append(
            f"model = {cfg['model']!r} is served by vLLM up to {entry.vllm_max}; vllm_version = {version!r}: "
            f"set vllm_version to {entry.vllm_max} or earlier"
        )
    for key, since in (
        ("vllm_tool_call_parser", facts.tool_parsers),
        ("vllm_reasoning_parser", facts.reasoning_parsers),
    ):
        parser = cfg[key]
        if parser in since and release < since[parser]:
            found.append(
                f"{key} = {parser!r} first ships in vLLM {since[parser]}; vllm_version = {version!r}: "
                f"set vllm_version to {since[parser]} or later"
            )
    if cfg["vllm_engine_ready_timeout"] and facts.reads_env("VLLM_ENGINE_READY_TIMEOUT_S", release) is False:
        since = facts.env_since["VLLM_ENGINE_READY_TIMEOUT_S"]
        found.append(
            f"vllm_engine_ready_timeout = {cfg['vllm_engine_ready_timeout']} needs vLLM {since} or later "
            f"(VLLM_ENGINE_READY_TIMEOUT_S); vllm_version = {version!r}: remove the key, or set vllm_version to "
            f"{since} or later"
        )
    if cfg["vllm_env"].get("VLLM_USE_V1") == "0" and release >= facts.v0_removed_in:
        found.append(
            f"vllm_env sets VLLM_USE_V1='0', but vLLM {version} has no V0 engine (removed in {facts.v0_removed_in}): "
            "remove VLLM_USE_V1 from vllm_env"
        )
    allowed = facts.transformers_for(release)
    pin = pinned(cfg, "transformers")
    if pin is not None and allowed is not None and pin not in allowed:
        found.append(
            f"vllm_extra_packages pins transformers=={pin}, which vLLM {version} refuses (its wheel requires "
            f"transformers{allowed}): pin a transformers version that matches, or change vllm_version"
        )
    if entry is not None and "transformers" in entry.needs and pin is None and allowed is not None:
        need = entry.needs["transformers"]
        if not could_meet(need, allowed):
            first = next(
                (first for first, spec in facts.transformers if first > release and could_meet(need, spec)), None
            )
            found.append(
                f"model = {cfg['model']!r} needs transformers{need}, which vLLM {version} refuses (its wheel requires "
                f"transformers{allowed}): set vllm_version to {first or 'a release that accepts it'} or later"
            )
    return found


def model_problems(cfg: Mapping[str, Any], entry: catalog.Model) -> list[str]:
    found = []
    for package, need in entry.needs.items():
        pin = pinned(cfg, package)
        if pin is not None and pin not in need:
            found.append(
                f"model = {cfg['model']!r} needs {package}{need}; vllm_extra_packages pins {package}=={pin}: "
                f"pin a version that matches {need}"
            )
    tp = cfg["vllm_tensor_parallel_size"]
    heads = entry.attention_heads
    if heads is not None and heads % tp:
        divisors = [size for size in range(1, 65) if heads % size == 0]
        found.append(
            f"vllm_tensor_parallel_size = {tp} does not divide the {heads} attention heads of {cfg['model']!r}: "
            f"use one of {divisors}"
        )
    if entry.trust_remote_code and not cfg["vllm_trust_remote_code"]:
        found.append(
            f"model = {cfg['model']!r} runs its own Python code from its repo; vllm_trust_remote_code = False: "
            "set vllm_trust_remote_code to true"
        )
    return found


def combination_warnings(cfg: Mapping[str, Any]) -> list[str]:
    """What runs but is known to go wrong: logged while planning, the deploy goes on."""
    entry = catalog.find(cfg["model"])
    release = vllm_release(cfg)
    found = []
    if entry is not None and entry.architecture == "Glm4ForCausalLM" and cfg["vllm_tool_call_parser"] == "hermes":
        found.append(
            f"vllm_tool_call_parser = 'hermes' on {cfg['model']!r}: hermes parses <tool_call> JSON blocks, which "
            "the GLM-4-0414 models do not write, so their tool calls come back as plain text; vLLM has no "
            "tool-call parser for this family: leave vllm_tool_call_parser unset and parse calls in the client"
        )
    if entry is not None and release is not None:
        found += [
            f"model = {cfg['model']!r} on vllm_version = {cfg['vllm_version']!r}: {why}"
            for condition, why in entry.warnings
            if release in condition
        ]
    if release is not None:
        facts = catalog.vllm_facts()
        found += [
            f"vllm_env sets {name}, which vLLM {cfg['vllm_version']} no longer reads (gone since "
            f"{facts.env_removed[name]}): it does nothing; remove it from vllm_env"
            for name in cfg["vllm_env"]
            if facts.reads_env(name, release) is False and not (name == "VLLM_USE_V1" and cfg["vllm_env"][name] == "0")
        ]
    if (
        release is not None
        and pinned(cfg, "transformers") is None
        and release in catalog.vllm_facts().transformers_unbounded
    ):
        found.append(
            f"vllm_version = {cfg['vllm_version']!r}: this vLLM's wheel sets no upper bound on transformers, so a "
            "fresh install resolves the newest (5.x), released after it; pin the transformers it was tested "
            "with in vllm_extra_packages"
        )
    return found


# Host checks: plain values from the host's facts.


def gpus_needed(cfg: Mapping[str, Any], hosts: int = 1) -> int:
    """The GPUs each of ``hosts`` hosts gives the layout (a replica group's hosts share it)."""
    return (
        cfg["vllm_tensor_parallel_size"] * cfg["vllm_pipeline_parallel_size"] * cfg["vllm_data_parallel_size"] // hosts
    )


def host_problems(
    cfg: Mapping[str, Any],
    *,
    gpu_count: int | None = None,
    gpu_memory_mib: int | None = None,
    gpu_generation: str | None = None,
    driver_cuda_version: str | None = None,
    listeners: Iterable[tuple[int, str | None]] | None = None,
    own_unit: str = "vllm.service",
    group_hosts: int = 1,
    interfaces: Iterable[str] | None = None,
) -> list[str]:
    """What this host cannot do with this configuration. Each argument is a fact of the host
    (None: not known, that check is skipped): ``gpu_memory_mib`` is the smallest GPU's memory,
    ``gpu_generation`` the oldest GPU's generation (glmfleet/facts/gpu.py), ``listeners`` pairs
    each listening TCP port with the systemd unit holding it (None: none), ``group_hosts`` the
    hosts of the replica group sharing the layout, ``interfaces`` the host's network interfaces."""
    found = []
    needed = gpus_needed(cfg, group_hosts)
    if gpu_count is not None and needed > gpu_count:
        dp = cfg["vllm_data_parallel_size"]
        shared = f" on each of the group's {group_hosts} hosts" if group_hosts > 1 else ""
        found.append(
            f"vllm_tensor_parallel_size = {cfg['vllm_tensor_parallel_size']} × vllm_pipeline_parallel_size = "
            f"{cfg['vllm_pipeline_parallel_size']}"
            + (f" × vllm_data_parallel_size = {dp}" if dp > 1 else "")
            + f" needs {needed} GPUs{shared}, the host has {gpu_count}: lower them so that it needs at most {gpu_count}"
            + (", or add hosts to the group" if group_hosts > 1 else "")
        )
    interface = cfg["vllm_group_interface"]
    if cfg["vllm_group"] and interface and interfaces is not None and interface not in interfaces:
        found.append(
            f"vllm_group_interface = '{interface}' is not a network interface of this host (it has "
            f"{', '.join(interfaces) or 'none'}): set it to the one on the group's network"
        )
    if gpu_generation is not None:
        found += generation_problems(cfg, gpu_generation)
    if gpu_memory_mib is not None:
        found += capacity_problems(cfg, gpu_memory_mib / 1024, gpu_count)
    release = vllm_release(cfg)
    if driver_cuda_version is not None and release is not None:
        needed = catalog.vllm_facts().cuda_runtime_for(release)
        driver = Version(driver_cuda_version)
        if needed is not None and driver.major < needed.major:
            found.append(
                f"the driver supports CUDA {driver_cuda_version}, but vllm_version = {cfg['vllm_version']!r} runs "
                f"torch built for CUDA {needed}: install a driver for CUDA {needed.major}.x, or pin a vLLM "
                f"release built for CUDA {driver.major}.x"
            )
    port = cfg["vllm_port"]
    owners = sorted(
        {
            unit or "a process outside any systemd service"
            for bound, unit in listeners or ()
            if bound == port and unit != own_unit
        }
    )
    if owners:
        owner = " and ".join(owners)
        found.append(f"vllm_port = {port} is already in use by {owner}: set vllm_port to a free port, or stop {owner}")
    return found


def host_warnings(cfg: Mapping[str, Any], *, driver_cuda_version: str | None = None) -> list[str]:
    release = vllm_release(cfg)
    if driver_cuda_version is None or release is None:
        return []
    needed = catalog.vllm_facts().cuda_runtime_for(release)
    driver = Version(driver_cuda_version)
    if needed is None or driver.major != needed.major or driver >= needed:
        return []
    return [
        f"the driver supports CUDA {driver_cuda_version}, older than the CUDA {needed} of vllm_version = "
        f"{cfg['vllm_version']!r}'s torch: it runs through CUDA minor-version compatibility, but kernels compiled "
        f"at run time for the newer CUDA can fail; upgrade the driver to one for CUDA {needed}"
    ]


# FP8 tensor cores (and vLLM's FP8 checkpoints' kernels) arrived with Ada (compute capability 8.9).
FIRST_FP8_GENERATION = "ada"


def generation_problems(cfg: Mapping[str, Any], generation: str) -> list[str]:
    """The model's weights or kernels against the host's GPU generation."""
    entry = catalog.find(cfg["model"])
    if entry is None:
        return []
    found = []
    order = catalog.GENERATIONS
    if entry.precision == "fp8" and order.index(generation) < order.index(FIRST_FP8_GENERATION):
        bf16 = catalog.load().sibling(entry, "bf16")
        found.append(
            f"model = {cfg['model']!r} is an FP8 checkpoint, and this host's GPUs ({generation.title()}) have no FP8: "
            + (f"serve {bf16.name!r} ({bf16.hf}) instead, " if bf16 else "")
            + "or use Ada, Hopper or Blackwell GPUs"
        )
    if entry.gpu_generations is not None and generation not in entry.gpu_generations:
        kinds = " or ".join(name.title() for name in entry.gpu_generations)
        found.append(
            f"model = {cfg['model']!r} ({entry.architecture}) runs on vLLM kernels for {kinds} GPUs only; this host's "
            f"are {generation.title()}: serve it on {kinds} GPUs"
        )
    return found


def memory_needed_gib(
    entry: catalog.Model,
    tensor_parallel: int,
    pipeline_parallel: int,
    context: int | None,
    data_parallel: int = 1,
    expert_parallel: bool = False,
) -> tuple[float, float] | None:
    """(weights, KV cache for one sequence of ``context`` tokens) per GPU in GiB; None without sizes.

    vLLM refuses to start when its KV cache cannot hold one sequence of the maximum length,
    so that one sequence is the least KV cache a configuration needs. Data parallel copies the
    model, unless expert parallel spreads a mixture-of-experts model's experts over every GPU
    of every copy: then the weights count as if all of them were experts (a lower bound).
    """
    if entry.weights_gib is None:
        return None
    shards = tensor_parallel * pipeline_parallel * (data_parallel if expert_parallel else 1)
    weights = entry.weights_gib / shards
    per_token = entry.kv_cache_bytes_per_token(tensor_parallel, pipeline_parallel)
    kv = per_token * context / catalog.GIB if per_token is not None and context else 0.0
    return weights, kv


def fits(
    entry: catalog.Model,
    tensor_parallel: int,
    pipeline_parallel: int,
    context: int | None,
    utilization: float,
    gpu_memory_gib: float,
    data_parallel: int = 1,
    expert_parallel: bool = False,
) -> bool:
    need = memory_needed_gib(entry, tensor_parallel, pipeline_parallel, context, data_parallel, expert_parallel)
    return need is None or sum(need) + RESERVE_GIB <= utilization * gpu_memory_gib


def divides_heads(entry: catalog.Model, tensor_parallel: int) -> bool:
    return entry.attention_heads is None or entry.attention_heads % tensor_parallel == 0


def recommend_tp(
    entry: catalog.Model,
    gpu_memory_gib: float,
    utilization: float = 0.9,
    context: int | None = None,
    gpu_count: int = max(TP_SIZES),
) -> int | None:
    """The smallest tensor parallel size on one host that divides the heads and fits."""
    context = context or entry.context
    for tp in TP_SIZES:
        if tp <= gpu_count and divides_heads(entry, tp) and fits(entry, tp, 1, context, utilization, gpu_memory_gib):
            return tp
    return None


def hosts_needed(
    entry: catalog.Model, gpu_count: int, gpu_memory_gib: float, utilization: float, context: int | None
) -> int | None:
    """How many hosts of ``gpu_count`` such GPUs one replica spans (tensor parallel over each
    host's GPUs, pipeline parallel over the hosts); None beyond 16 hosts or without sizes."""
    tp = max((size for size in TP_SIZES if size <= gpu_count and divides_heads(entry, size)), default=None)
    if tp is None or entry.weights_gib is None:
        return None
    return next((hosts for hosts in range(1, 17) if fits(entry, tp, hosts, context, utilization, gpu_memory_gib)), None)


def smallest_gpu_gib(entry: catalog.Model, gpu_count: int, utilization: float, context: int | None) -> float | None:
    """The least memory per GPU with which one host of ``gpu_count`` GPUs holds the model."""
    tp = max((size for size in TP_SIZES if size <= gpu_count and divides_heads(entry, size)), default=None)
    need = memory_needed_gib(entry, tp, 1, context) if tp else None
    return None if need is None else (sum(need) + RESERVE_GIB) / utilization


def layout_advice(
    entry: catalog.Model, gpu_count: int | None, gpu_memory_gib: float, utilization: float, context: int | None
) -> list[str]:
    """What would fit: a tensor parallel size on this host, bigger GPUs, or several hosts."""
    count = gpu_count or max(TP_SIZES)
    tp = recommend_tp(entry, gpu_memory_gib, utilization, context, count)
    if tp is not None:
        return [f"set vllm_tensor_parallel_size to {tp}"]
    advice = []
    smallest = smallest_gpu_gib(entry, count, utilization, context)
    if smallest is not None:
        advice.append(f"use {count} GPUs of at least {smallest:.0f} GiB in one host")
    hosts = hosts_needed(entry, count, gpu_memory_gib, utilization, context)
    if hosts is not None:
        advice.append(
            f"or span {hosts} hosts of {count} such GPUs with one replica group (README: Several hosts per replica)"
        )
    return advice


def capacity_problems(cfg: Mapping[str, Any], gpu_memory_gib: float, gpu_count: int | None = None) -> list[str]:
    entry = catalog.find(cfg["model"])
    if entry is None:
        return []
    tp, pp, dp = cfg["vllm_tensor_parallel_size"], cfg["vllm_pipeline_parallel_size"], cfg["vllm_data_parallel_size"]
    ep = cfg["vllm_enable_expert_parallel"]
    context = cfg["vllm_max_model_len"] or entry.context
    utilization = cfg["vllm_gpu_memory_utilization"]
    if fits(entry, tp, pp, context, utilization, gpu_memory_gib, dp, ep):
        return []
    weights, kv = memory_needed_gib(entry, tp, pp, context, dp, ep)
    usable = utilization * gpu_memory_gib
    if dp > 1:
        # Copies of the model: spreading a mixture-of-experts model's experts over them may do.
        fixes = (
            ["set vllm_enable_expert_parallel to true"]
            if entry.experts and not ep and fits(entry, tp, pp, context, utilization, gpu_memory_gib, dp, True)
            else ["lower vllm_data_parallel_size"]
        )
    else:
        same = f"set vllm_tensor_parallel_size to {tp}"
        fixes = [fix for fix in layout_advice(entry, gpu_count, gpu_memory_gib, utilization, context) if fix != same]
    if kv > 0 and weights + RESERVE_GIB < usable:
        fixes.append("lower vllm_max_model_len")
    if utilization < 0.95 and weights + kv + RESERVE_GIB <= 0.95 * gpu_memory_gib:
        fixes.append("raise vllm_gpu_memory_utilization")
    layout = f"vllm_tensor_parallel_size = {tp}" + (f", vllm_pipeline_parallel_size = {pp}" if pp > 1 else "")
    layout += f", vllm_data_parallel_size = {dp}" + (" with expert parallel" if ep else "") if dp > 1 else ""
    return [
        f"{cfg['model']!r} ({entry.weights_gib:.0f} GiB of {entry.precision} weights) needs about "
        f"{weights + kv + RESERVE_GIB:.1f} GiB per GPU (weights {weights:.1f}, KV cache for one {context}-token "
        f"sequence {kv:.1f}, reserve {RESERVE_GIB:.0f}) with {layout}, but vllm_gpu_memory_utilization = "
        f"{utilization} of {gpu_memory_gib:.1f} GiB leaves {usable:.1f} GiB: "
        + ", ".join(fixes or ["use GPUs with more memory"])
    ]

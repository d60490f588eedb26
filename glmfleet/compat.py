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
    """Whether some version meets both: the catalog's needs are lower bounds (``>=X``), so
    the lowest version a need names must itself be allowed."""
    lowest = [Version(spec.version) for spec in need if spec.operator in (">=", "==")]
    return not lowest or any(version in allowed for version in lowest)


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


def host_problems(
    cfg: Mapping[str, Any],
    *,
    gpu_count: int | None = None,
    gpu_memory_mib: int | None = None,
    driver_cuda_version: str | None = None,
    listeners: Iterable[tuple[int, str | None]] | None = None,
    own_unit: str = "vllm.service",
) -> list[str]:
    """What this host cannot do with this configuration. Each argument is a fact of the host
    (None: not known, that check is skipped): ``gpu_memory_mib`` is the smallest GPU's memory,
    ``listeners`` pairs each listening TCP port with the systemd unit holding it (None: none)."""
    found = []
    gpus_needed = cfg["vllm_tensor_parallel_size"] * cfg["vllm_pipeline_parallel_size"]
    if gpu_count is not None and gpus_needed > gpu_count:
        found.append(
            f"vllm_tensor_parallel_size = {cfg['vllm_tensor_parallel_size']} × vllm_pipeline_parallel_size = "
            f"{cfg['vllm_pipeline_parallel_size']} needs {gpus_needed} GPUs, the host has {gpu_count}: "
            f"lower them so their product is at most {gpu_count}"
        )
    if gpu_memory_mib is not None:
        found += capacity_problems(cfg, gpu_memory_mib / 1024)
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


def memory_needed_gib(
    entry: catalog.Model, tensor_parallel: int, pipeline_parallel: int, context: int | None
) -> tuple[float, float] | None:
    """(weights, KV cache for one sequence of ``context`` tokens) per GPU in GiB; None without sizes.

    vLLM refuses to start when its KV cache cannot hold one sequence of the maximum length,
    so that one sequence is the least KV cache a configuration needs.
    """
    if entry.weights_gib is None:
        return None
    weights = entry.weights_gib / (tensor_parallel * pipeline_parallel)
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
) -> bool:
    need = memory_needed_gib(entry, tensor_parallel, pipeline_parallel, context)
    return need is None or sum(need) + RESERVE_GIB <= utilization * gpu_memory_gib


def recommend_tp(
    entry: catalog.Model, gpu_memory_gib: float, utilization: float = 0.9, context: int | None = None
) -> int | None:
    """The smallest tensor parallel size on one host that divides the heads and fits."""
    context = context or entry.context
    for tp in TP_SIZES:
        if (entry.attention_heads is None or entry.attention_heads % tp == 0) and fits(
            entry, tp, 1, context, utilization, gpu_memory_gib
        ):
            return tp
    return None


def capacity_problems(cfg: Mapping[str, Any], gpu_memory_gib: float) -> list[str]:
    entry = catalog.find(cfg["model"])
    if entry is None:
        return []
    tp, pp = cfg["vllm_tensor_parallel_size"], cfg["vllm_pipeline_parallel_size"]
    context = cfg["vllm_max_model_len"] or entry.context
    utilization = cfg["vllm_gpu_memory_utilization"]
    if fits(entry, tp, pp, context, utilization, gpu_memory_gib):
        return []
    weights, kv = memory_needed_gib(entry, tp, pp, context)
    usable = utilization * gpu_memory_gib
    fixes = []
    better = recommend_tp(entry, gpu_memory_gib, utilization, context)
    if better is not None and better > tp:
        fixes.append(f"set vllm_tensor_parallel_size to {better}")
    if kv > 0 and weights + RESERVE_GIB < usable:
        fixes.append("lower vllm_max_model_len")
    if utilization < 0.95:
        fixes.append("raise vllm_gpu_memory_utilization")
    fixes.append("or use GPUs with more memory")
    return [
        f"{cfg['model']!r} needs about {weights + kv + RESERVE_GIB:.1f} GiB per GPU (weights {weights:.1f}, KV cache "
        f"for one {context}-token sequence {kv:.1f}, reserve {RESERVE_GIB:.0f}) with vllm_tensor_parallel_size = {tp} "
        f"and vllm_pipeline_parallel_size = {pp}, but vllm_gpu_memory_utilization = {utilization} of "
        f"{gpu_memory_gib:.1f} GiB leaves {usable:.1f} GiB: " + ", ".join(fixes)
    ]

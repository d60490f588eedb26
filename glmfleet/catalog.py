"""The GLM model catalog (files/catalog.yaml): what glmfleet knows about each model and about
the vLLM releases that serve them.

:func:`find` looks a model up by catalog name or repo id; :meth:`Model.defaults_for` gives the
settings the catalog supplies for a vLLM release (glmfleet/config.py layers them between the
roles' defaults and the user's data); glmfleet/compat.py checks combinations against the facts.
The file is validated when loaded, so a bad edit fails every run and the tests at once.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from glmfleet import FILES

CATALOG = FILES / "catalog.yaml"
GIB = 1024**3
BF16_BYTES = 2


class CatalogError(ValueError):
    """files/catalog.yaml does not have the shape glmfleet reads."""


@dataclass(frozen=True)
class DefaultBlock:
    """Settings the catalog supplies; with ``vllm`` set, only for the real vllm package at a
    matching version."""

    settings: dict[str, Any]
    vllm: SpecifierSet | None


# Bytes per parameter of each precision the catalog knows.
PRECISION_BYTES = {"bf16": 2, "fp8": 1}
# GPU generations, oldest first (glmfleet/facts/gpu.py tells a host's).
GENERATIONS = ("volta", "turing", "ampere", "ada", "hopper", "blackwell")


@dataclass(frozen=True)
class Model:
    name: str
    hf: str
    aliases: tuple[str, ...]
    modelscope: str | None
    architecture: str
    family: str
    precision: str
    parameters_b: float | None
    weights_gib: float | None  # measured, else parameters x the precision's bytes
    weights_measured: bool
    vllm_min: Version
    vllm_max: Version | None
    vllm_checked: Version
    needs: dict[str, SpecifierSet]
    trust_remote_code: bool
    context: int | None
    attention_heads: int | None
    kv_cache: dict[str, int] | None
    experts: int | None
    mtp_tokens: int | None
    mtp_by_default: bool
    gpu_generations: tuple[str, ...] | None
    kv_cache_dtype: dict[str, str]
    warnings: tuple[tuple[SpecifierSet, str], ...]
    defaults: tuple[DefaultBlock, ...]
    notes: str

    def repo_ids(self) -> tuple[str, ...]:
        return (self.hf, *self.aliases, *((self.modelscope,) if self.modelscope else ()))

    def defaults_for(self, vllm: Version | None) -> dict[str, Any]:
        """The settings this model gets from the catalog; ``vllm`` is None unless the package is
        the real vLLM (a test double's version says nothing about vLLM's releases)."""
        settings: dict[str, Any] = {}
        if self.mtp_by_default and self.mtp_tokens:
            settings["vllm_speculative_config"] = self.mtp_config()
        for block in self.defaults:
            if block.vllm is None or (vllm is not None and vllm in block.vllm):
                settings.update(block.settings)
        return settings

    def mtp_config(self) -> dict[str, Any]:
        """vLLM's ``--speculative-config`` for the model's own multi-token prediction layers."""
        return {"method": "mtp", "num_speculative_tokens": self.mtp_tokens}

    def kv_cache_bytes_per_token(self, tensor_parallel: int, pipeline_parallel: int) -> float | None:
        """KV cache one token takes on one GPU, in bytes (None where the catalog lacks the shape).

        Pipeline stages split the layers. Tensor parallel splits the KV heads, down to one head
        per GPU (vLLM replicates heads when there are more GPUs than heads); a multi-head latent
        attention cache is one latent per layer, replicated on every GPU.
        """
        if self.kv_cache is None:
            return None
        layers = math.ceil(self.kv_cache["layers"] / pipeline_parallel)
        if "latent" in self.kv_cache:
            return layers * self.kv_cache["latent"] * BF16_BYTES
        heads_per_gpu = math.ceil(self.kv_cache["kv_heads"] / tensor_parallel)
        return layers * heads_per_gpu * self.kv_cache["head_dim"] * 2 * BF16_BYTES


@dataclass(frozen=True)
class VllmFacts:
    """What glmfleet knows about vLLM's releases, each table keyed by first release."""

    broken: dict[Version, str]
    cuda_runtime: tuple[tuple[Version, Version], ...]
    transformers: tuple[tuple[Version, SpecifierSet], ...]
    transformers_unbounded: SpecifierSet
    v0_removed_in: Version
    tool_parsers: dict[str, Version]
    reasoning_parsers: dict[str, Version]
    env_since: dict[str, Version]
    env_removed: dict[str, Version]
    flashinfer_kernels: tuple[tuple[Version, str], ...]

    def cuda_runtime_for(self, vllm: Version) -> Version | None:
        """The CUDA runtime of the torch this vLLM release pins (None before the table starts)."""
        return from_table(self.cuda_runtime, vllm)

    def transformers_for(self, vllm: Version) -> SpecifierSet | None:
        """The transformers versions this release's wheel accepts (an empty set: any)."""
        return from_table(self.transformers, vllm)

    def flashinfer_kernels_for(self, vllm: Version) -> str | None:
        """Where this release's FlashInfer kernels come from (files/catalog.yaml explains)."""
        return from_table(self.flashinfer_kernels, vllm)

    def reads_env(self, name: str, vllm: Version) -> bool | None:
        """Whether this release reads a variable; None where the catalog does not know."""
        if name in self.env_removed and vllm >= self.env_removed[name]:
            return False
        if name in self.env_since:
            return vllm >= self.env_since[name]
        return None


def package_name(requirement: str) -> str:
    """The normalized (PEP 503) name of a requirement such as 'Transformers[torch]==5.0'."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>!~ ;]", requirement, maxsplit=1)[0]).lower()


def from_table(table, version: Version):
    found = None
    for first, value in table:
        if version >= first:
            found = value
    return found


@dataclass(frozen=True)
class Catalog:
    vllm: VllmFacts
    models: dict[str, Model]

    def find(self, model: str) -> Model | None:
        """The entry for a catalog name (any case) or one of its repo ids."""
        if model.lower() in self.models:
            return self.models[model.lower()]
        return next((entry for entry in self.models.values() if model in entry.repo_ids()), None)

    def sibling(self, entry: Model, precision: str) -> Model | None:
        """The entry of the same family in another precision (GLM-5-FP8 -> GLM-5)."""
        return next(
            (other for other in self.models.values() if other.family == entry.family and other.precision == precision),
            None,
        )


# Parsing, with errors that name the entry and field.


def version(where: str, value: Any) -> Version:
    try:
        return Version(str(value))
    except InvalidVersion:
        raise CatalogError(f"{where}: {value!r} is not a version") from None


def specifier(where: str, value: Any) -> SpecifierSet:
    try:
        return SpecifierSet(str(value))
    except InvalidSpecifier:
        raise CatalogError(f"{where}: {value!r} is not a version specifier such as '>=0.10.1'") from None


def optional_number(where: str, value: Any, kind: type) -> Any:
    if value is not None and (type(value) not in (kind, int) or value <= 0):
        raise CatalogError(f"{where}: {value!r} is neither null nor a positive number")
    return value


def parse_kv_cache(where: str, value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    shapes = ({"layers", "kv_heads", "head_dim"}, {"layers", "latent"})
    if (
        not isinstance(value, dict)
        or set(value) not in shapes
        or not all(type(v) is int and v > 0 for v in value.values())
    ):
        raise CatalogError(
            f"{where}: {value!r} is not {{layers, kv_heads, head_dim}} or {{layers, latent}} of positive integers"
        )
    return dict(value)


MODEL_FIELDS = {
    "hf",
    "aliases",
    "modelscope",
    "architecture",
    "family",
    "precision",
    "parameters_b",
    "weights_gib",
    "vllm_min",
    "vllm_max",
    "vllm_checked",
    "needs",
    "trust_remote_code",
    "context",
    "attention_heads",
    "kv_cache",
    "experts",
    "mtp_tokens",
    "mtp_by_default",
    "gpu_generations",
    "kv_cache_dtype",
    "warnings",
    "defaults",
    "notes",
}


def parse_generations(where: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or set(value) - set(GENERATIONS):
        raise CatalogError(f"{where}: {value!r} is neither null nor a list of {list(GENERATIONS)}")
    return tuple(value)


def parse_model(name: str, raw: Any) -> Model:
    where = f"{CATALOG.name}: models.{name}"
    if not isinstance(raw, dict) or set(raw) != MODEL_FIELDS:
        missing = MODEL_FIELDS - set(raw or {})
        extra = set(raw or {}) - MODEL_FIELDS
        raise CatalogError(
            f"{where}: fields must be exactly {sorted(MODEL_FIELDS)} (missing {sorted(missing)}, unknown {sorted(extra)})"
        )
    if name != name.lower():
        raise CatalogError(f"{where}: catalog names are lower case")
    defaults = []
    for index, block in enumerate(raw["defaults"]):
        if (
            not isinstance(block, dict)
            or not isinstance(block.get("settings"), dict)
            or set(block) - {"settings", "vllm"}
        ):
            raise CatalogError(
                f"{where}.defaults[{index}]: expected {{settings: {{...}}}} with an optional vllm specifier"
            )
        condition = specifier(f"{where}.defaults[{index}].vllm", block["vllm"]) if "vllm" in block else None
        defaults.append(DefaultBlock(dict(block["settings"]), condition))
    if raw["precision"] not in PRECISION_BYTES:
        raise CatalogError(f"{where}.precision: {raw['precision']!r} is not one of {sorted(PRECISION_BYTES)}")
    parameters = optional_number(f"{where}.parameters_b", raw["parameters_b"], float)
    measured = optional_number(f"{where}.weights_gib", raw["weights_gib"], float)
    derived = None if parameters is None else parameters * 1e9 * PRECISION_BYTES[raw["precision"]] / GIB
    generations = parse_generations(f"{where}.gpu_generations", raw["gpu_generations"])
    kv_dtype = raw["kv_cache_dtype"]
    if not isinstance(kv_dtype, dict) or set(kv_dtype) - set(generations or GENERATIONS):
        raise CatalogError(f"{where}.kv_cache_dtype: {kv_dtype!r} is not a mapping of its GPU generations to dtypes")
    mtp_tokens = optional_number(f"{where}.mtp_tokens", raw["mtp_tokens"], int)
    if raw["mtp_by_default"] and mtp_tokens is None:
        raise CatalogError(f"{where}.mtp_by_default: true needs mtp_tokens")
    model = Model(
        name=name,
        hf=raw["hf"],
        aliases=tuple(raw["aliases"]),
        modelscope=raw["modelscope"],
        architecture=raw["architecture"],
        family=raw["family"],
        precision=raw["precision"],
        parameters_b=parameters,
        weights_gib=measured if measured is not None else derived,
        weights_measured=measured is not None,
        vllm_min=version(f"{where}.vllm_min", raw["vllm_min"]),
        vllm_max=None if raw["vllm_max"] is None else version(f"{where}.vllm_max", raw["vllm_max"]),
        vllm_checked=version(f"{where}.vllm_checked", raw["vllm_checked"]),
        needs={package: specifier(f"{where}.needs.{package}", spec) for package, spec in raw["needs"].items()},
        trust_remote_code=bool(raw["trust_remote_code"]),
        context=optional_number(f"{where}.context", raw["context"], int),
        attention_heads=optional_number(f"{where}.attention_heads", raw["attention_heads"], int),
        kv_cache=parse_kv_cache(f"{where}.kv_cache", raw["kv_cache"]),
        experts=optional_number(f"{where}.experts", raw["experts"], int),
        mtp_tokens=mtp_tokens,
        mtp_by_default=bool(raw["mtp_by_default"]),
        gpu_generations=generations,
        kv_cache_dtype=dict(kv_dtype),
        warnings=tuple((specifier(f"{where}.warnings", w["vllm"]), w["why"]) for w in raw["warnings"]),
        defaults=tuple(defaults),
        notes=raw["notes"],
    )
    if not (model.vllm_min <= model.vllm_checked and (model.vllm_max is None or model.vllm_checked <= model.vllm_max)):
        raise CatalogError(f"{where}.vllm_checked: {model.vllm_checked} is outside vllm_min .. vllm_max")
    return model


def parse_table(where: str, raw: dict, parse_value) -> tuple:
    rows = sorted((version(where, first), parse_value(f"{where}.{first}", value)) for first, value in raw.items())
    return tuple(rows)


def parse_env(raw: dict) -> tuple[dict[str, Version], dict[str, Version]]:
    since, removed = {}, {}
    for name, when in raw.items():
        if not isinstance(when, dict) or not when or set(when) - {"since", "removed"}:
            raise CatalogError(f"vllm.env.{name}: expected {{since: version}} and/or {{removed: version}}")
        if "since" in when:
            since[name] = version(f"vllm.env.{name}.since", when["since"])
        if "removed" in when:
            removed[name] = version(f"vllm.env.{name}.removed", when["removed"])
    return since, removed


KERNEL_SOURCES = ("with_wheel", "at_start", "download")


def kernel_source(where: str, value: Any) -> str:
    if value not in KERNEL_SOURCES:
        raise CatalogError(f"{where}: {value!r} is not one of {list(KERNEL_SOURCES)}")
    return value


def parse(raw: Any) -> Catalog:
    if not isinstance(raw, dict) or set(raw) != {"vllm", "models"}:
        raise CatalogError(f"{CATALOG.name}: expected the top-level keys vllm and models")
    facts = raw["vllm"]
    env_since, env_removed = parse_env(facts["env"])
    vllm = VllmFacts(
        broken={version("vllm.broken", release): why for release, why in facts["broken"].items()},
        cuda_runtime=parse_table("vllm.cuda_runtime", facts["cuda_runtime"], version),
        transformers=parse_table("vllm.transformers", facts["transformers"], specifier),
        transformers_unbounded=specifier("vllm.transformers_unbounded", facts["transformers_unbounded"]),
        v0_removed_in=version("vllm.v0_removed_in", facts["v0_removed_in"]),
        tool_parsers={name: version(f"vllm.tool_parsers.{name}", v) for name, v in facts["tool_parsers"].items()},
        reasoning_parsers={
            name: version(f"vllm.reasoning_parsers.{name}", v) for name, v in facts["reasoning_parsers"].items()
        },
        env_since=env_since,
        env_removed=env_removed,
        flashinfer_kernels=parse_table("vllm.flashinfer_kernels", facts["flashinfer_kernels"], kernel_source),
    )
    models = {name: parse_model(name, entry) for name, entry in raw["models"].items()}
    seen: dict[str, str] = {}
    for entry in models.values():
        for repo in entry.repo_ids():
            if repo in seen:
                raise CatalogError(f"{CATALOG.name}: repo id {repo} is listed by both {seen[repo]} and {entry.name}")
            seen[repo] = entry.name
        if entry.vllm_checked in vllm.broken:
            raise CatalogError(f"{CATALOG.name}: models.{entry.name}.vllm_checked names a broken release")
    return Catalog(vllm, models)


@functools.cache
def load(path: Path = CATALOG) -> Catalog:
    return parse(yaml.safe_load(path.read_text(encoding="utf-8")))


def find(model: str) -> Model | None:
    return load().find(model)


def vllm_facts() -> VllmFacts:
    return load().vllm

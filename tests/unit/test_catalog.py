"""The model catalog: every GLM model of the issue is there, the file validates, and its
defaults layer between the roles' defaults and the user's data without overriding the user."""

from __future__ import annotations

import copy

import pytest
import yaml
from packaging.version import Version

from glmfleet import catalog, compat
from glmfleet.config import ConfigError, resolve
from roles.glm4_patch import needs_patch
from roles.vllm_service import served_model_name, vllm_command

ISSUE_MODELS = {
    "THUDM/glm-4-9b-chat": "glm-4-9b-chat",
    "THUDM/glm-4-9b-chat-hf": "glm-4-9b-chat-hf",
    "zai-org/GLM-4-9B-0414": "glm-4-9b-0414",
    "zai-org/GLM-4-32B-0414": "glm-4-32b-0414",
    "zai-org/GLM-Z1-32B-0414": "glm-z1-32b-0414",
    "zai-org/GLM-4.5": "glm-4.5",
    "zai-org/GLM-4.5-Air": "glm-4.5-air",
    "zai-org/GLM-4.5V": "glm-4.5v",
    "zai-org/GLM-4.6": "glm-4.6",
    "zai-org/GLM-4.7": "glm-4.7",
    "zai-org/GLM-4.7-Flash": "glm-4.7-flash",
}
MODELS_OF_2026 = {
    "zai-org/GLM-4.5-FP8": "glm-4.5-fp8",
    "zai-org/GLM-4.5-Air-FP8": "glm-4.5-air-fp8",
    "zai-org/GLM-4.6-FP8": "glm-4.6-fp8",
    "zai-org/GLM-4.7-FP8": "glm-4.7-fp8",
    "zai-org/GLM-4.6V": "glm-4.6v",
    "zai-org/GLM-4.6V-FP8": "glm-4.6v-fp8",
    "zai-org/GLM-4.6V-Flash": "glm-4.6v-flash",
    "zai-org/GLM-OCR": "glm-ocr",
    "zai-org/GLM-5": "glm-5",
    "zai-org/GLM-5-FP8": "glm-5-fp8",
    "zai-org/GLM-5.1": "glm-5.1",
    "zai-org/GLM-5.1-FP8": "glm-5.1-fp8",
    "zai-org/GLM-5.2": "glm-5.2",
    "zai-org/GLM-5.2-FP8": "glm-5.2-fp8",
    "zai-org/GLM-5.3": "glm-5.3",
    "zai-org/GLM-5.3-BF16": "glm-5.3-bf16",
    "zai-org/GLM-5.3-Flash": "glm-5.3-flash",
}
ALL_MODELS = {**ISSUE_MODELS, **MODELS_OF_2026}


@pytest.mark.parametrize(("repo", "name"), ALL_MODELS.items())
def test_every_glm_model_is_found_by_name_and_by_each_repo_id(repo, name):
    entry = catalog.find(name)
    assert entry is not None and entry.name == name
    assert catalog.find(repo) is entry
    assert catalog.find(name.upper()) is entry
    assert entry.modelscope is None or (
        catalog.find(entry.modelscope) is entry and entry.modelscope.startswith("ZhipuAI/")
    )


def test_unknown_models_are_not_guessed():
    assert catalog.find("zai-org/GLM-9") is None
    assert catalog.find("glm-4") is None


@pytest.mark.parametrize("name", ALL_MODELS.values())
def test_each_model_resolves_to_a_complete_profile_on_the_release_the_catalog_checked(name):
    cfg = resolve({"model": name})  # raises if the catalog's own defaults break a rule
    entry = catalog.find(name)
    assert cfg.model == entry.hf
    assert cfg.vllm_version == str(entry.vllm_checked) and entry.vllm_checked >= entry.vllm_min
    assert Version(cfg.vllm_version) not in catalog.vllm_facts().broken
    assert entry.weights_gib is not None, "the capacity check needs a size"


@pytest.mark.parametrize("memory_gib", [24, 48, 80, 141, 180])
@pytest.mark.parametrize("name", ALL_MODELS.values())
def test_the_recommended_tensor_parallel_size_is_the_smallest_that_fits(name, memory_gib):
    entry = catalog.find(name)
    tp = compat.recommend_tp(entry, memory_gib)
    if tp is None:
        assert not compat.fits(entry, 8, 1, entry.context, 0.9, memory_gib) or entry.attention_heads % 8
    else:
        assert compat.divides_heads(entry, tp) and compat.fits(entry, tp, 1, entry.context, 0.9, memory_gib)
        assert tp == 1 or not compat.fits(entry, tp // 2, 1, entry.context, 0.9, memory_gib)


def test_every_catalog_default_is_a_value_its_setting_accepts():
    from glmfleet.config import all_settings

    settings = all_settings()
    for entry in catalog.load().models.values():
        for block in entry.defaults:
            for key, value in block.settings.items():
                assert key in settings, f"{entry.name}: {key} is not a glmfleet key"
                assert settings[key].check(value), f"{entry.name}: {key} = {value!r}"


def raw_catalog():
    return yaml.safe_load(catalog.CATALOG.read_text())


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda raw: raw["models"]["glm-4.5"].pop("vllm_min"), "models.glm-4.5: fields must be exactly"),
        (
            lambda raw: raw["models"]["glm-4.5"].update(vllm_min="ten"),
            "models.glm-4.5.vllm_min: 'ten' is not a version",
        ),
        (lambda raw: raw["models"]["glm-4.5"].update(kv_cache={"layers": 92}), "models.glm-4.5.kv_cache"),
        (
            lambda raw: raw["models"]["glm-4.5"]["defaults"].append({"vllm": "~=nope", "settings": {}}),
            "not a version specifier",
        ),
        (
            lambda raw: raw["models"]["glm-4.6"].update(hf="zai-org/GLM-4.5"),
            "zai-org/GLM-4.5 is listed by both glm-4.5 and glm-4.6",
        ),
    ],
)
def test_a_broken_catalog_is_refused_naming_entry_and_field(edit, words):
    raw = copy.deepcopy(raw_catalog())
    edit(raw)
    with pytest.raises(catalog.CatalogError, match=words.replace(".", r"\.").replace("(", r"\(")):
        catalog.parse(raw)


def test_a_catalog_name_is_a_valid_model_and_becomes_the_hub_repo():
    cfg = resolve({"model": "glm-4.7-flash", "model_revision": "a" * 40})
    argv = vllm_command(cfg)
    # vLLM serves the weights role's verified copy of the catalog's hub repo, under its name
    assert argv[2] == "/var/lib/glmfleet/models/zai-org--GLM-4.7-Flash/" + "a" * 40
    assert served_model_name(cfg) == "zai-org/GLM-4.7-Flash"
    assert argv[argv.index("--tool-call-parser") + 1] == "glm47"
    assert argv[argv.index("--reasoning-parser") + 1] == "glm45"
    assert "--enable-auto-tool-choice" in argv
    # vLLM 0.33's wheel itself asks for transformers 5.16 or later: no pin of glmfleet's
    assert cfg.vllm_version == "0.33.0" and cfg.vllm_extra_packages == []
    assert resolve({"model": "glm-4.7-flash", "vllm_version": "0.22.0"}).vllm_extra_packages == ["transformers==5.23.0"]


def test_a_repo_id_the_user_gives_is_served_as_given():
    cfg = resolve({"model": "THUDM/glm-4-9b-chat"})
    assert cfg.model == "THUDM/glm-4-9b-chat" and cfg.vllm_trust_remote_code is True


def test_a_name_outside_the_catalog_is_rejected_with_what_is_accepted():
    with pytest.raises(
        ConfigError, match="model = 'glm-9.9' is invalid; accepted: a catalog name such as 'glm-4.7-flash'"
    ):
        resolve({"model": "glm-9.9"})


def test_any_hub_repo_with_explicit_settings_is_served():
    cfg = resolve(
        {
            "model": "someone/glm-finetune",
            "vllm_tool_call_parser": "glm45",
            "vllm_enable_auto_tool_choice": True,
            "model_revision": "a" * 40,
        }
    )
    argv = vllm_command(cfg)
    assert (
        argv[2] == "/var/lib/glmfleet/models/someone--glm-finetune/" + "a" * 40 and "--enable-auto-tool-choice" in argv
    )


def test_the_operators_glm_z1_recipe_gets_v0_the_old_transformers_and_the_patch():
    cfg = resolve({"model": "glm-z1-32b-0414", "vllm_version": "0.8.4", "vllm_tensor_parallel_size": 4})
    assert cfg.vllm_env == {"VLLM_USE_V1": "0"}
    assert cfg.vllm_extra_packages == ["transformers==4.51.3"]
    assert needs_patch(cfg)
    argv = vllm_command(cfg)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4" and "--shutdown-timeout" not in argv


def test_on_a_newer_vllm_the_recipe_defaults_drop_out():
    cfg = resolve({"model": "glm-z1-32b-0414", "vllm_version": "0.8.5"})
    assert cfg.vllm_env == {} and cfg.vllm_extra_packages == ["transformers==4.51.3"]
    assert not needs_patch(cfg)
    assert resolve({"model": "glm-z1-32b-0414", "vllm_version": "0.12.0"}).vllm_extra_packages == []


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({}, {"VLLM_USE_V1": "0"}),
        ({"vllm_env": {"VLLM_LOGGING_LEVEL": "DEBUG"}}, {"VLLM_USE_V1": "0", "VLLM_LOGGING_LEVEL": "DEBUG"}),
        ({"vllm_env": {"VLLM_USE_V1": "1"}}, {"VLLM_USE_V1": "1"}),
    ],
)
def test_user_environment_adds_to_the_catalogs_and_wins_per_variable(user, expected):
    cfg = resolve({"model": "glm-4-32b-0414", "vllm_version": "0.8.4", **user})
    assert cfg.vllm_env == expected


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (["hf-transfer==0.1.9"], ["transformers==5.23.0", "hf-transfer==0.1.9"]),
        (["Transformers==5.22.0"], ["Transformers==5.22.0"]),
        (["transformers[torch]==5.22.0"], ["transformers[torch]==5.22.0"]),
    ],
)
def test_user_pins_add_to_the_catalogs_and_win_per_package(user, expected):
    data = {"model": "glm-4.7-flash", "vllm_version": "0.22.0", "vllm_extra_packages": user}
    assert resolve(data).vllm_extra_packages == expected


def test_a_setting_the_user_sets_wins_even_when_it_unsets_the_catalogs():
    cfg = resolve({"model": "glm-4.5", "vllm_tool_call_parser": None, "vllm_enable_auto_tool_choice": False})
    argv = vllm_command(cfg)
    assert "--tool-call-parser" not in argv and "--enable-auto-tool-choice" not in argv
    assert argv[argv.index("--reasoning-parser") + 1] == "glm45"


def test_a_stand_in_package_gets_the_flags_but_none_of_vllms_version_defaults():
    cfg = resolve({"model": "glm-z1-32b-0414", "vllm_package": "vllm-test-double", "vllm_version": "0.1.0"})
    assert cfg.vllm_env == {} and cfg.vllm_extra_packages == []
    flash = resolve({"model": "glm-4.7-flash", "vllm_package": "vllm-test-double", "vllm_version": "0.1.0"})
    assert flash.vllm_extra_packages == [] and flash.vllm_tool_call_parser == "glm47"


def test_multimodal_limits_render_as_vllm_reads_them():
    argv = vllm_command(resolve({"model": "glm-4.5v"}))
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image":4,"video":1}'


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_glm_5_1_gets_its_whole_profile_from_one_key():
    cfg = resolve({"model": "glm-5.1", "vllm_tensor_parallel_size": 8, "model_revision": "a" * 40})
    argv = vllm_command(cfg, "hopper")
    assert cfg.vllm_version == "0.33.0"
    assert (flag(argv, "--tool-call-parser"), flag(argv, "--reasoning-parser")) == ("glm47", "glm45")
    assert flag(argv, "--speculative-config") == '{"method":"mtp","num_speculative_tokens":3}'
    assert flag(argv, "--chat-template-content-format") == "string"
    assert "--enable-expert-parallel" in argv and "--trust-remote-code" not in argv
    assert "--kv-cache-dtype" not in argv  # vLLM's own choice: no recipe asks otherwise for GLM-5.1


@pytest.mark.parametrize(
    ("generation", "dtype"), [("hopper", "fp8"), ("blackwell", "fp8_e4m3"), ("ampere", None), (None, None)]
)
def test_the_kv_cache_dtype_follows_the_recipe_for_the_hosts_gpu_generation(generation, dtype):
    argv = vllm_command(resolve({"model": "glm-5.2-fp8"}), generation)
    assert flag(argv, "--kv-cache-dtype") == dtype
    # the user's choice wins on every generation
    assert (
        flag(
            vllm_command(resolve({"model": "glm-5.2-fp8", "vllm_kv_cache_dtype": "auto"}), generation),
            "--kv-cache-dtype",
        )
        == "auto"
    )


def test_mtp_follows_the_recipe_and_the_user_turns_it_off_or_on():
    assert flag(vllm_command(resolve({"model": "glm-5.2"})), "--speculative-config") == (
        '{"method":"mtp","num_speculative_tokens":5}'
    )
    assert "--speculative-config" not in vllm_command(resolve({"model": "glm-5.2", "vllm_speculative_config": {}}))
    assert "--speculative-config" not in vllm_command(resolve({"model": "glm-5"}))  # opt-in in its recipe
    mtp = {"method": "mtp", "num_speculative_tokens": 1}
    assert flag(vllm_command(resolve({"model": "glm-5", "vllm_speculative_config": mtp})), "--speculative-config") == (
        '{"method":"mtp","num_speculative_tokens":1}'
    )


@pytest.mark.parametrize(
    ("data", "timeout"),
    [
        ({"vllm_version": "0.13.0", "model": "x/y"}, None),  # that release does not read the variable
        ({"vllm_version": "0.14.0", "model": "x/y"}, "1800"),  # vllm_start_timeout: vLLM gives up no sooner
        ({"vllm_version": "0.14.0", "model": "x/y", "vllm_start_timeout": 7200}, "7200"),
        ({"vllm_version": "0.14.0", "model": "x/y", "vllm_engine_ready_timeout": 900}, "900"),
    ],
)
def test_the_engine_ready_timeout_reaches_vllm_where_the_release_reads_it(data, timeout):
    from roles.vllm_service import vllm_environment

    assert vllm_environment(resolve(data)).get("VLLM_ENGINE_READY_TIMEOUT_S") == timeout


def test_a_users_pin_wins_over_the_catalogs_release_and_is_checked():
    assert resolve({"model": "glm-5.2", "vllm_version": "0.25.1"}).vllm_version == "0.25.1"
    with pytest.raises(ConfigError, match="needs vLLM 0.23.0 or later; vllm_version = '0.22.0'"):
        resolve({"model": "glm-5.2", "vllm_version": "0.22.0"})


def test_readme_shows_the_catalog_as_it_is():
    from glmfleet_cli.models import models_table

    readme = open("README.md", encoding="utf-8").read()
    assert models_table() in readme, "README.md's model table is stale: paste `glmfleet models`"

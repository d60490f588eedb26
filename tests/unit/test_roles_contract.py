"""Every role keeps the one contract of glmfleet/role.py: a deploy function named as the module,
settings declared once and documented in that function's docstring as pyinfra documents
operation arguments, and only the optional parts it has."""

from __future__ import annotations

import inspect

import pytest

from glmfleet.config import Setting
from glmfleet.role import deploy_function
from roles import ROLES

OPTIONAL = {"SETTINGS": tuple, "questions": 1, "combination_problems": 2, "prepare": 1}


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.__name__)
def test_a_role_has_its_deploy_function_and_declares_only_what_it_has(role):
    function = deploy_function(role)
    assert callable(function)
    settings = getattr(role, "SETTINGS", ())
    assert isinstance(settings, tuple) and all(isinstance(setting, Setting) for setting in settings)
    assert settings or "Data keys:" not in (function.__doc__ or "")
    for setting in settings:
        assert f"+ {setting.name}: " in function.__doc__, f"{setting.name} is not documented in {function.__name__}"
    for name in ("questions", "combination_problems", "prepare"):
        if hasattr(role, name):
            assert len(inspect.signature(getattr(role, name)).parameters) >= OPTIONAL[name]


def test_setting_names_are_unique_and_prefixed_by_what_they_configure():
    names = [setting.name for role in ROLES for setting in getattr(role, "SETTINGS", ())]
    assert len(names) == len(set(names))
    prefixes = (
        "vllm_",
        "model",
        "hf_",
        "modelscope_",
        "nvidia_",
        "docker_",
        "container_",
        "gateway_",
        "pip_",
        "uv_",
        "verify_",
        "node_exporter_",
        "dcgm_",
        "prometheus_",
        "grafana",
    )
    assert [name for name in names if not name.startswith(prefixes)] == []

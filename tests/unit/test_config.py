"""The configuration model: defaults, precedence, and every rejection, through pyinfra's own
inventory loader (inventory file, group_data/, --data), so the merge tested is the CLI's."""

from __future__ import annotations

import textwrap

import pytest
from pyinfra.api import Config, State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

from glmfleet import catalog
from glmfleet.config import ConfigError, all_settings, host_config, resolve, settings_table, validate_inventory
from roles.model_weights import sync_argv
from roles.vllm_service import render_env_file, render_unit, vllm_command, vllm_environment


def load(tmp_path, inventory: str, group_data: dict[str, str] | None = None, override: dict | None = None):
    """Write an inventory (and group_data files beside it) and load it as `pyinfra` would."""
    ctx_state.set(State())  # the loader executes the files within a pyinfra state
    (tmp_path / "inventory.py").write_text(textwrap.dedent(inventory))
    for group, text in (group_data or {}).items():
        (tmp_path / "group_data").mkdir(exist_ok=True)
        (tmp_path / "group_data" / f"{group}.py").write_text(textwrap.dedent(text))
    return make_inventory(str(tmp_path / "inventory.py"), override_data=override or {}, cwd=str(tmp_path))


def test_defaults_fill_every_declared_key():
    """Each role's default, but the vLLM release: the one the catalog checked the model with."""
    cfg = resolve({})
    for name, setting in all_settings().items():
        if name != "vllm_version":
            assert cfg[name] == setting.default
    assert cfg.vllm_version == str(catalog.find(all_settings()["model"].default).vllm_checked)
    assert resolve({"model": "owner/not-in-the-catalog"}).vllm_version == all_settings()["vllm_version"].default


def test_precedence_host_over_group_over_all(tmp_path):
    inventory = load(
        tmp_path,
        """
        gpus = [("h1", {"vllm_port": 8101}), ("h2", {})]
        """,
        {"all": "vllm_port = 8001\nvllm_max_model_len = 4096\n", "gpus": "vllm_port = 8002\n"},
    )
    configs = validate_inventory(inventory)
    assert configs["h1"].vllm_port == 8101  # host data wins
    assert configs["h2"].vllm_port == 8002  # then its group's
    assert configs["h2"].vllm_max_model_len == 4096  # then all
    assert configs["h2"].vllm_gpu_memory_utilization == 0.9  # then the role's default


def test_data_override_beats_everything(tmp_path):
    inventory = load(tmp_path, 'hosts = [("h1", {"vllm_port": 8101})]\n', override={"vllm_port": 9000})
    assert validate_inventory(inventory)["h1"].vllm_port == 9000


def test_an_inventory_is_validated_once_per_run(tmp_path):
    """pyinfra executes deploy.py once per host: the run's first call checks every host and the
    others reuse it (checking each time made planning grow with the square of the fleet). The
    next run, a State of its own, checks again."""
    inventory = load(tmp_path, 'hosts = [("h1", {}), ("h2", {"vllm_port": 8101})]\n')
    State(inventory, Config())
    configs = validate_inventory(inventory)
    assert validate_inventory(inventory) is configs
    assert host_config(inventory.get_host("h2")) is configs["h2"]
    inventory.host_data["h1"]["vllm_port"] = 0
    State(inventory, Config())
    assert "h1: vllm_port = 0 is invalid" in str(pytest.raises(ConfigError, validate_inventory, inventory).value)


BAD_VALUES = [
    # (key, value, words the error must carry)
    ("vllm_port", 0, "an integer 1-65535"),
    ("vllm_port", 65536, "an integer 1-65535"),
    ("vllm_port", "8000", "an integer 1-65535"),
    ("vllm_port", True, "an integer 1-65535"),
    ("vllm_gpu_memory_utilization", 1.5, "a number > 0 and <= 1"),
    ("vllm_gpu_memory_utilization", 0, "a number > 0 and <= 1"),
    ("vllm_tensor_parallel_size", 0, "an integer 1-64"),
    ("vllm_max_model_len", 64, "None or an integer 128-10485760"),
    ("vllm_host", "localhost:8000", "an IP address"),
    ("vllm_runtime", "conda", "'venv'"),
    ("vllm_version", ">=0.15", "a version such as"),
    ("vllm_extra_packages", ["transformers>=4.51"], "'name==version' pins"),
    ("vllm_extra_args", "--enable-prefix-caching", "a list of strings"),
    ("vllm_env", {"BAD-NAME": "1"}, "a mapping of variable names"),
    ("vllm_env", {"A": "two\nlines"}, "one-line strings"),
    ("model", "not a repo", "'owner/name'"),
    ("model_source", "s3", "one of 'hf', 'modelscope', 'control', 'path', 'peer'"),
    ("model_disk_margin_gb", -1, "a number 0-100000"),
    ("hf_endpoint", "mirror.internal", "None or an http(s) URL"),
    ("model_revision", "main", "a 40-hex commit id"),
    ("model_dir", "relative/dir", "an absolute, normalised path"),
    ("model_dir", "/srv/../etc", "an absolute, normalised path"),
    ("vllm_venv_root", "/usr", "not a system directory"),
    ("vllm_state_dir", "/tmp/vllm", "not a system directory"),
    ("vllm_package", "x;touch${IFS}/root/pwned;#", "a package name (PEP 508)"),
    ("vllm_venv_root", "/opt/glm fleet", "no spaces"),
    ("nvidia_cuda_repo_url", "https://mirror/{foo}/x", "placeholders: {distro} and {arch}"),
    ("model_peer_address", "10.0.0.1\nevil", "control character"),
    ("vllm_extra_args", ["--enable-prefix-caching\n--api-key=x"], "control character"),
    ("pip_index_url", "pypi.example", "an http(s) or file URL"),
    ("vllm_trust_remote_code", "yes", "true or false"),
]


@pytest.mark.parametrize(("key", "value", "accepted"), BAD_VALUES)
def test_bad_value_is_rejected_naming_host_key_value_and_accepted(tmp_path, key, value, accepted):
    inventory = load(tmp_path, f'gpus = [("gpu-7", {{{key!r}: {value!r}}})]\n')
    with pytest.raises(ConfigError) as error:
        validate_inventory(inventory)
    message = str(error.value)
    assert f"gpu-7: {key} = {value!r} is invalid" in message
    assert accepted in message
    assert "no host was changed" in message


def test_bad_value_in_group_data_is_rejected(tmp_path):
    inventory = load(tmp_path, 'gpus = ["gpu-1", "gpu-2"]\n', {"gpus": "vllm_gpu_memory_utilization = 1.5\n"})
    message = str(pytest.raises(ConfigError, validate_inventory, inventory).value)
    assert "gpu-1: vllm_gpu_memory_utilization = 1.5 is invalid" in message
    assert "gpu-2: vllm_gpu_memory_utilization = 1.5 is invalid" in message


def test_bad_value_from_data_flag_is_rejected(tmp_path):
    inventory = load(tmp_path, 'gpus = ["gpu-1"]\n', override={"vllm_port": 0})
    assert "gpu-1: vllm_port = 0 is invalid" in str(pytest.raises(ConfigError, validate_inventory, inventory).value)


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    inventory = load(tmp_path, 'gpus = [("gpu-1", {"vllm_verison": "0.22.0"})]\n')
    message = str(pytest.raises(ConfigError, validate_inventory, inventory).value)
    assert "gpu-1: unknown key vllm_verison = '0.22.0' (did you mean vllm_version?)" in message


def test_pyinfra_connector_keys_are_not_ours_to_reject(tmp_path):
    inventory = load(tmp_path, 'gpus = [("gpu-1", {"ssh_port": 2222, "ssh_user": "ubuntu", "_sudo": True})]\n')
    assert validate_inventory(inventory)["gpu-1"].vllm_port == 8000


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"vllm_extra_args": ["--port", "9000"]}, "vllm_extra_args contains '--port'; set vllm_port instead"),
        (
            {"vllm_extra_args": ["--api-key=abc"]},
            "vllm_extra_args contains '--api-key'; set vllm_api_key instead (a key on the command line is visible",
        ),
        ({"vllm_extra_args": ["-tp", "2"]}, "vllm_extra_args contains '-tp'; set vllm_tensor_parallel_size instead"),
        ({"vllm_env": {"VLLM_API_KEY": "abc"}}, "vllm_env sets VLLM_API_KEY; set vllm_api_key instead"),
        ({"vllm_env": {"HF_HOME": "/x"}}, "vllm_env sets HF_HOME; set vllm_state_dir instead"),
    ],
)
def test_impossible_combinations_are_rejected(data, expected):
    with pytest.raises(ConfigError) as error:
        resolve(data, "gpu-1")
    assert f"gpu-1: {expected}" in str(error.value)


def test_every_problem_of_every_host_is_reported_at_once(tmp_path):
    inventory = load(tmp_path, 'gpus = [("a", {"vllm_port": 0}), ("b", {"vllm_portt": 1}), ("c", {})]\n')
    message = str(pytest.raises(ConfigError, validate_inventory, inventory).value)
    assert "a: vllm_port = 0" in message and "b: unknown key vllm_portt" in message
    assert "c:" not in message


def test_secrets_are_never_echoed_in_errors():
    with pytest.raises(ConfigError) as error:
        resolve({"vllm_api_key": 12345678})
    assert "12345678" not in str(error.value)
    assert "vllm_api_key = <hidden> is invalid" in str(error.value)


def test_secrets_stay_out_of_the_unit_and_in_the_env_file():
    cfg = resolve({"vllm_api_key": "sk-test-4242", "hf_token": "hf_test_4242", "model_revision": "a" * 40})
    assert "4242" not in " ".join(vllm_command(cfg))
    assert "4242" not in render_unit(cfg)
    env_file = render_env_file(vllm_environment(cfg))
    assert 'VLLM_API_KEY="sk-test-4242"' in env_file
    # The hub token is only for fetching (a root-only file the weights script reads): vLLM
    # serves offline and never sees it.
    assert "hf_test_4242" not in env_file and "hf_test_4242" not in " ".join(sync_argv(cfg, "hf"))


def test_command_renders_each_key():
    cfg = resolve(
        {
            "model": "zai-org/GLM-4.7-Flash",
            "vllm_port": 8123,
            "vllm_max_model_len": 4096,
            "vllm_served_model_name": "glm",
            "vllm_extra_args": ["--enable-prefix-caching"],
            "model_revision": "a" * 40,
        }
    )
    argv = vllm_command(cfg)
    # vLLM serves the verified local copy: <vllm_state_dir>/models/<owner>--<name>/<revision>
    assert argv[:3] == [
        "/opt/glmfleet/vllm/current/bin/vllm",
        "serve",
        "/var/lib/glmfleet/models/zai-org--GLM-4.7-Flash/" + "a" * 40,
    ]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--port"] == "8123" and flags["--max-model-len"] == "4096"
    assert flags["--served-model-name"] == "glm" and "--revision" not in argv
    assert argv[-1] == "--enable-prefix-caching"


def test_model_dir_serves_offline_from_the_directory():
    cfg = resolve({"model_dir": "/srv/models/glm", "model_revision": "b" * 40})
    argv = vllm_command(cfg)
    assert argv[2] == "/srv/models/glm" and "--revision" not in argv
    assert argv[argv.index("--served-model-name") + 1] == cfg.model
    assert vllm_environment(cfg)["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(("version", "drains"), [("0.17.1", False), ("0.18.0", True), ("0.22.0", True)])
def test_shutdown_timeout_only_where_vllm_drains(version, drains):
    argv = vllm_command(resolve({"vllm_version": version}))
    assert ("--shutdown-timeout" in argv) == drains


def test_exec_start_quotes_what_systemd_would_split_or_expand():
    cfg = resolve({"vllm_extra_args": ["--chat-template", "a b", "--x", "50%$HOME"]})
    exec_start = next(line for line in render_unit(cfg).splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith('--chat-template "a b" --x 50%%$$HOME')


def test_readme_documents_every_key():
    readme = open("README.md", encoding="utf-8").read()
    assert settings_table() in readme, "README.md's key table is stale: paste `glmfleet keys`"


def test_the_example_production_inventory_is_valid(monkeypatch):
    monkeypatch.setenv("GLMFLEET_VLLM_API_KEY", "sk-example")
    ctx_state.set(State())
    configs = validate_inventory(make_inventory("inventory/prod.py", override_data={}, cwd="."))
    assert sorted(configs) == ["gpu-01.example.internal", "gpu-02.example.internal"]
    assert {cfg.vllm_tensor_parallel_size for cfg in configs.values()} == {8}
    assert {cfg.vllm_api_key for cfg in configs.values()} == {"sk-example"}

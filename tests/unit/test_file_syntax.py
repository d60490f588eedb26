"""One rule per file syntax (glmfleet/filesyntax.py): hostile values written into each kind of
file glmfleet renders read back exactly, by the reader that file has, or are refused with the
reason. The systemd unit and env file are read back by real systemd on the fleet
(tests/test_deploy_fleet.py reads the running service's argv and environment); nginx's by real
nginx (tests/test_rollout_fleet.py, whose API key holds every character nginx escapes)."""

from __future__ import annotations

import shlex

import pytest

from glmfleet import filesyntax
from glmfleet.config import ConfigError, resolve
from glmfleet.facts.output import host_script
from glmfleet.layout import WEIGHTS_SCRIPT
from roles.model_weights.fanout import authorized_line
from roles.vllm_service import render_env_file, render_unit

HOSTILE = [
    "plain",
    "a b",
    'q"uote',
    "back\\slash",
    "dollar$HOME",
    "${IFS}",
    "`id`",
    "$(id)",
    "50%",
    "%n",
    "'single'",
    ";",
    "#x",
    "tail\\",
    "=eq=",
    "ünïcode",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_env_file_values_read_back_exactly(tmp_path, value):
    """The verify script reads the API key back from the env file as systemd does."""
    for runtime in ("venv", "image"):
        path = tmp_path / f"{runtime}.env"
        path.write_text(render_env_file({"VLLM_API_KEY": value, "OTHER": "x"}, runtime))
        assert host_script("verify_vllm").read_env_file(str(path))["VLLM_API_KEY"] == value


def test_exec_start_words_read_back_as_systemd_splits_them():
    """files/vllm_status.py reads ExecStart back (shlex, then systemd's %% and $$) to the argv."""
    cfg = resolve({"vllm_extra_args": ["--chat-template", *HOSTILE], "model_revision": "a" * 40})
    line = next(line for line in render_unit(cfg).splitlines() if line.startswith("ExecStart="))
    argv = host_script("vllm_status").exec_start(f"{line}\n")
    assert argv[-len(HOSTILE) :] == HOSTILE
    assert filesyntax.systemd_word(";") == "\\;"  # a lone ; separates commands in a unit


@pytest.mark.parametrize("value", ["new\nline", "nul\x00", "tab\t", "esc\x1b[0m", "line\u2028sep"])
def test_control_characters_are_refused_by_every_file_and_every_setting(value):
    for write in (
        filesyntax.systemd_word,
        filesyntax.nginx_string,
        lambda v: filesyntax.systemd_env_line("K", v),
        lambda v: filesyntax.docker_env_line("K", v),
        filesyntax.authorized_keys_option,
        lambda v: filesyntax.debian_defaults([v]),
        filesyntax.apt_preferences_string,
    ):
        with pytest.raises(filesyntax.Unwritable):
            write(value)
    for key, data in (
        ("vllm_env", {"vllm_env": {"K": value}}),
        ("vllm_extra_args", {"vllm_extra_args": [value]}),
        ("vllm_served_model_name", {"vllm_served_model_name": value}),
        ("model_include", {"model_include": [value]}),
    ):
        with pytest.raises(ConfigError, match=f"{key} = .* holds a control character"):
            resolve(data)


def test_nginx_strings_escape_quotes_and_backslashes():
    assert filesyntax.nginx_string('Bearer a"b\\c$d') == '"Bearer a\\"b\\\\c$d"'


def test_authorized_keys_takes_the_store_as_one_shell_word_and_refuses_quotes():
    cfg = resolve({"model_revision": "a" * 40, "model_source": "peer"})
    line = authorized_line(cfg, "ssh-ed25519 AAAAkey glmfleet-peer-transfer")
    assert line == (
        f'restrict,command="{WEIGHTS_SCRIPT} give --store /var/lib/glmfleet/models" ssh-ed25519 AAAAkey '
        "glmfleet-peer-transfer"
    )
    for value in ('a"b', "a\\b"):
        with pytest.raises(filesyntax.Unwritable, match="double quote or a backslash"):
            filesyntax.authorized_keys_option(value)
    assert shlex.split(filesyntax.authorized_keys_option(f"{WEIGHTS_SCRIPT} give --store '/a b'")[1:-1]) == [
        WEIGHTS_SCRIPT,
        "give",
        "--store",
        "/a b",
    ]


@pytest.mark.parametrize(
    ("host", "port", "line"),
    [("10.0.0.1", 22, "10.0.0.1"), ("gpu-1.example", 2222, "[gpu-1.example]:2222"), ("::1", 2201, "[::1]:2201")],
)
def test_known_hosts_names_exactly_one_host(host, port, line):
    assert filesyntax.known_hosts_host(host, port) == line


@pytest.mark.parametrize("host", ["*", "a,b", "a b", "!a", "h?", "@fake/gpu-1", ""])
def test_known_hosts_refuses_patterns_and_lists(host):
    with pytest.raises(filesyntax.Unwritable):
        filesyntax.known_hosts_host(host, 22)


@pytest.mark.parametrize("value", HOSTILE)
def test_prometheus_and_grafana_files_read_back_every_value(value):
    """YAML (prometheus.yml, Grafana's provisioning) and JSON (file_sd targets) as their readers
    parse them: labels, host names and URLs come back exactly."""
    import json

    import yaml

    data = {"labels": {"host": value}, "targets": [f"{value}:9100"]}
    assert yaml.safe_load(filesyntax.yaml_document(data, f"about {value}")) == data
    assert json.loads(filesyntax.json_document([data])) == [data]


def test_debian_defaults_take_only_words_systemd_splits_as_written():
    text = filesyntax.debian_defaults(["--web.listen-address=[::1]:9100", "--storage.tsdb.retention.time=15d"])
    assert text.splitlines()[1] == 'ARGS="--web.listen-address=[::1]:9100 --storage.tsdb.retention.time=15d"'
    for value in [word for word in HOSTILE if word not in ("plain", "=eq=", "ünïcode", "50%", "%n")]:
        with pytest.raises(filesyntax.Unwritable, match=r"\$ARGS"):
            filesyntax.debian_defaults([f"--flag={value}"])


def test_apt_preferences_values_refuse_a_double_quote():
    assert filesyntax.apt_preferences_string("developer.download.nvidia.com") == '"developer.download.nvidia.com"'
    with pytest.raises(filesyntax.Unwritable, match="double quote"):
        filesyntax.apt_preferences_string('a"b')
    assert (
        filesyntax.host_port("::1", 9090) == "[::1]:9090" and filesyntax.host_port("10.0.0.1", 9090) == "10.0.0.1:9090"
    )

"""The class of shell injection, tried on every role: every string setting is set to a hostile
value (``;``, ``$(...)``, backticks, spaces, quotes, a backslash, globs, ``#``), validation
bypassed, and every command every role plans (and every command builder a rollout uses) is
lexed as sh lexes it: each hostile value must come out as literal characters of one word,
never as shell syntax. Settings whose format check refuses such values are also checked to
refuse them, and secrets must not appear in any command at all."""

from __future__ import annotations

import json
import re

import pytest
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.deploy import add_deploy
from pyinfra.context import ctx_host, ctx_state

from glmfleet import config
from glmfleet.config import HostConfig, all_settings, values
from glmfleet.operations import _run_live
from glmfleet.role import deploy_function
from roles import MONITORING_ROLES, gateway, prepare_control_node, serving_host
from roles.known_good import keep_command, restore_command
from roles.verify import verify_argv, wait_command
from roles.vllm_flags import check_command
from roles.vllm_venv import switch_command
from tests.support.paths import FIXTURES
from tests.support.planning import fake_host, gpu_host

# What each hostile value carries after its marker: everything sh treats as syntax.
PAYLOAD = "a b;touch${IFS}pwned;$(id)`id`'q\"z\\w *?[x]&|<>#"
# Settings whose value steers which code runs (choices, versions parsed as versions, the
# revision's fixed format), or that name files on the control node, not the host: their checks
# must refuse hostile values (test_format_checks_refuse_hostile_values), and they keep valid
# values while the others are hostile.
STEERING = {
    "vllm_runtime",
    "model_source",
    "model_peer_seed",
    "model_verify",
    "hf_xet",
    "nvidia_driver_source",
    "docker_source",
    "container_gpu_access",
    "vllm_version",
    "uv_version",
    "hf_cli_version",
    "modelscope_version",
    "nvidia_driver_version",
    "nvidia_driver_branch",
    "model_revision",
    "model_control_dir",
    "model_peer_key",
    "vllm_image_archive",
    # An address that a known_hosts line cannot hold stops the run (filesyntax.known_hosts_host).
    "model_peer_address",
    # Listen addresses go into $ARGS words and units, which refuse what an IP address cannot hold
    # (filesyntax.debian_defaults); the paired release is split into its two versions.
    "node_exporter_listen_address",
    "gateway_exporter_listen_address",
    "dcgm_exporter_listen_address",
    "prometheus_listen_address",
    "grafana_listen_address",
    "dcgm_exporter_release",
}
SECRETS = {name for name, setting in all_settings().items() if setting.secret}


def hostile(name: str, index: int):
    """A hostile value of the setting's shape, carrying a marker unique to the setting."""
    payload = f"{PAYLOAD}HOSTILE{index}X"
    setting = all_settings()[name]
    default = setting.default
    if any(setting.check(number) for number in (True, 1, 4096, 0.5)):  # a number or a switch: no string at all
        return None
    if name == "vllm_env":
        return {"GLMFLEET_HOSTILE": payload}
    if name == "vllm_limit_mm_per_prompt":
        return {payload: 1}
    if setting.check.urls and "placeholder" in setting.accepted:  # formatted: braces doubled to stay literal
        url = "https://mirror.example/" + payload.replace("{", "{{").replace("}", "}}")
        return [url] if isinstance(default, list) else url
    if isinstance(default, list):
        return [f"https://mirror.example/{payload}" if setting.check.urls else payload]
    if setting.check.urls:
        return f"https://mirror.example/{payload}"
    if isinstance(default, str) and default.startswith("/") or name in ("model_dir",):
        return f"/srv/{payload}"
    if isinstance(default, (str, type(None))):
        return payload
    return None


def hostile_settings() -> dict:
    found = {}
    for index, name in enumerate(sorted(all_settings())):
        if name in STEERING:
            continue
        value = hostile(name, index)
        if value is not None:
            found[name] = value
    return found


HOSTILE = hostile_settings()
MARKER = re.compile(r"HOSTILE\d+X")
# A hostile value as it reaches a command: itself, or inside JSON (vllm_limit_mm_per_prompt).
ENCODED_PAYLOADS = "(?:" + "|".join(map(re.escape, (PAYLOAD, json.dumps(PAYLOAD)[1:-1]))) + ")"


# --- sh's lexer, as far as the commands glmfleet writes use it ------------------------------------


def words(command: str) -> list[list[tuple[str, bool]]]:
    """The words sh splits ``command`` into, each a list of (character, literal): literal where
    the character was single-quoted or backslash-escaped, so that sh takes it as itself. Operators
    are words of their own; ``$(...)`` and backquotes open a nested command whose words are
    listed too; ``${...}`` is syntax."""
    found: list[list[tuple[str, bool]]] = []
    current: list[tuple[str, bool]] = []
    stack = ["top"]  # top, dq (double quotes), subst ($( or backquote), brace (${)
    i = 0

    def end_word():
        nonlocal current
        if current:
            found.append(current)
            current = []

    while i < len(command):
        c, state = command[i], stack[-1]
        two = command[i : i + 2]
        if state == "brace":
            current.append((c, False))
            if c == "}":
                stack.pop()
            i += 1
        elif state == "dq":
            if c == '"':
                stack.pop()
            elif c == "\\" and command[i + 1 : i + 2] in ('"', "\\", "$", "`", "\n"):
                current.append((command[i + 1], True))
                i += 1
            elif two == "$(":
                current.append(("$(", False))
                end_word()
                stack.append("subst")
                i += 1
            elif two == "${":
                current.append((c, False))
                stack.append("brace")
            elif c == "`":
                end_word()
                stack.append("backquote")
            else:
                current.append((c, c != "$"))  # in double quotes only $ (and ` above) still expands
            i += 1
        else:  # top, subst, backquote: quoting starts anew
            if c == "'":
                close = command.find("'", i + 1)
                if close < 0:  # unbalanced: sh refuses the command; nothing of it is a literal
                    current.extend((ch, False) for ch in command[i:])
                    break
                current.extend((ch, True) for ch in command[i + 1 : close])
                current.append(("", True))  # an empty '' is a word too
                i = close + 1
                continue
            if c == "\\":
                current.append((command[i + 1], True))
                i += 2
                continue
            if c == '"':
                stack.append("dq")
                current.append(("", True))
            elif two == "$(":
                end_word()
                stack.append("subst")
                i += 1
            elif two == "${":
                current.append((c, False))
                stack.append("brace")
            elif c == ")" and state == "subst":
                end_word()
                stack.pop()
            elif c == "`":
                end_word()
                if state == "backquote":
                    stack.pop()
                else:
                    stack.append("backquote")
            elif c.isspace():
                end_word()
            elif c in ";&|<>()":
                end_word()
                found.append([(c, False)])
            elif c == "#" and not current:
                i = command.find("\n", i)
                if i < 0:
                    break
                continue
            else:
                current.append((c, False))
            i += 1
    end_word()
    return found


def injected(command: str) -> list[str]:
    """The markers of hostile values that do not come out of ``command`` as one literal run of
    one word: each marker in the text must be the end of a whole payload, all of it literal."""
    wrong = []
    expected = MARKER.findall(command.replace("'\"'\"'", "'"))
    seen = []
    for word in words(command):
        text = "".join(ch for ch, _ in word)
        flags = [literal for ch, literal in word for _ in ch]
        for match in re.finditer(ENCODED_PAYLOADS + r"(HOSTILE\d+X)", text):
            if all(flags[match.start() : match.end()]):
                seen.append(match.group(1))
            else:
                wrong.append(match.group(1))
    missing = [marker for marker in expected if expected.count(marker) > seen.count(marker) + wrong.count(marker)]
    return sorted(set(wrong + missing))


def test_the_lexer_tells_a_quoted_value_from_an_injected_one():
    from glmfleet.shell import quote

    value = f"{PAYLOAD}HOSTILE1X"
    assert injected(f"echo {quote(value)} && ls") == []
    assert injected(f'x=$(cat {quote("/a/" + value)}); echo "$x"') == []
    assert injected(f"echo {value}") == ["HOSTILE1X"]
    assert injected(f'echo "{value}"') == ["HOSTILE1X"]  # double quotes still run $(id)
    assert injected(f"echo '{value}'") == ["HOSTILE1X"]  # its own quote ends the quoting


# --- planning every role with hostile values --------------------------------------------------


def planned_commands(state, host) -> list[str]:
    commands = []
    for op_hash in state.get_op_order():
        op_data = state.get_op_data_for_host(host, op_hash)
        if op_data is None:
            continue
        for command in op_data.command_generator():
            if isinstance(command, StringCommand):
                commands.append(command.get_raw_value())
            elif isinstance(command, FunctionCommand) and command.function is _run_live:
                commands.append(command.args[0])
    return commands


def plan_hostile(scenario: dict, deploy, **kwargs) -> tuple[list[str], HostConfig]:
    """Every command ``deploy`` plans for a fake host whose settings are the safe ``scenario``
    with every other string setting hostile (validation bypassed: the quoting must hold even for
    values a check let through)."""
    responses = {**gpu_host(), "useradd": ["/usr/sbin/useradd"], **scenario.pop("responses", {})}
    state, host = fake_host({"ssh_hostname": "10.0.0.1"}, responses)
    data = {**{k: v for k, v in HOSTILE.items() if k not in scenario}, **scenario}
    cfg = HostConfig(host.name, values(data, all_settings()))
    config._VALIDATED[state] = {host.name: cfg}
    prepare_control_node(state.inventory)
    add_deploy(state, deploy, **kwargs)
    with ctx_state.use(state), ctx_host.use(host):
        return planned_commands(state, host), cfg


SCENARIOS = {
    "venv from the hub, driver from the CUDA repository": {"model_source": "hf", "nvidia_driver_source": "cuda-repo"},
    "the real vllm (flag check), modelscope": {"vllm_package": "vllm", "model_source": "modelscope"},
    "image runtime, vLLM 0.8.4 (glm4.py patch), Docker's repository": {
        "vllm_runtime": "image",
        "vllm_package": "vllm",
        "vllm_version": "0.8.4",
        "nvidia_driver_source": "none",
    },
    # The model store's path goes into authorized_keys too, which refuses quotes (test_file_syntax.py).
    "peer fan-out": {"model_source": "peer", "model_peer_address": None, "model_root": "/srv/models"},
    "pushed from the control node": {"model_source": "control", "model_control_dir": None},
}


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("control") / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return str(directory)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_hostile_value_stays_one_literal_word_in_every_planned_command(scenario, control_dir):
    settings = dict(SCENARIOS[scenario], model_revision="a" * 40)
    if "model_control_dir" in settings:
        settings["model_control_dir"] = control_dir
    commands, cfg = plan_hostile(settings, serving_host)
    assert len(commands) > 10, commands  # the scenario planned the installs, not a stop
    rendered = "\n".join(commands)
    for name in SECRETS:
        assert str(cfg[name]) not in rendered, f"{name} reached a command line"
    for command in commands:
        assert injected(command) == [], command
    carried = {MARKER.search(str(HOSTILE[name])).group(0) for name in HOSTILE if name not in SECRETS and name in cfg}
    assert {m for m in carried if m in rendered}, "no hostile value reached a command: the test tests nothing"


def test_the_gateway_and_a_rollouts_commands_keep_hostile_values_literal():
    commands, cfg = plan_hostile({"model_revision": "a" * 40, "vllm_package": "vllm"}, gateway.gateway)
    builders = [
        keep_command(cfg),
        restore_command(cfg),
        check_command(cfg),
        wait_command(cfg, verify_argv(cfg)),
        switch_command(cfg.vllm_venv_root, "vllm-1", "vllm-0"),
    ]
    for command in commands + builders:
        assert injected(command) == [], command
    assert any(MARKER.search(command) for command in builders)


def test_the_monitoring_roles_keep_hostile_values_literal():
    """Every monitoring role planned on a GPU host (a driver runs: DCGM's CUDA build is known)
    with Grafana on: its repository, key and dashboard URLs, versions and paths stay literal."""
    cuda = (FIXTURES / "h100" / "nvidia-smi-version.txt").read_text().splitlines()
    rendered = []
    for role in MONITORING_ROLES:
        scenario = {"model_revision": "a" * 40, "grafana": True, "responses": gpu_host(cuda=cuda)}
        commands, cfg = plan_hostile(scenario, deploy_function(role))
        assert commands, f"{role.__name__} planned nothing"
        for command in commands:
            assert injected(command) == [], command
        rendered += commands
    assert MARKER.search("\n".join(rendered)), "no hostile value reached a command: the test tests nothing"


@pytest.mark.parametrize("name", sorted(STEERING - {"model_control_dir", "model_peer_key", "vllm_image_archive"}))
def test_format_checks_refuse_hostile_values(name):
    setting = all_settings()[name]
    assert not setting.check(f"{PAYLOAD}HOSTILE0X")
    assert not setting.check(f"/srv/{PAYLOAD}")

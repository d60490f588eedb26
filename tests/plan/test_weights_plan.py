"""What the weights role plans for a host in a given state, against pyinfra's @fake connector
(tests/planning.py): the host's weights fact answers as the real script prints it."""

from __future__ import annotations

import json

import pytest
from pyinfra.api import Inventory
from pyinfra.connectors.fake import FakeConnector
from pyinfra.context import ctx_host, ctx_state

from glmfleet.config import ConfigError
from glmfleet.facts.weights import ModelWeights
from glmfleet.layout import HUB_ENV_FILE
from roles.model_weights import model_weights, tools
from roles.model_weights.fanout import fanout_plans
from tests.support.planning import connected, plan, sectioned_output

HF = "/opt/glmfleet/huggingface_hub-2.4.0/bin/hf"
PIN = {"model_revision": "0123456789abcdef0123456789abcdef01234567"}


def weights_host(state: dict | None, tools=(HF,)) -> dict:
    """The ModelWeights fact's answer: the host's state file (None: none yet) over a model
    directory with no files, the CLIs installed and the host key."""
    return {
        "ssh_host_ed25519_key.pub": sectioned_output(
            key="k",
            tools=list(tools),
            host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
            state=json.dumps(state, indent=1).splitlines() if state else [],
            files=[],
        )
    }


COMPLETE = {"key": "k", "complete": True, "verified": {}}
UNFINISHED = {"key": "k", "complete": False, "verified": {}}


def names(ops) -> list[str]:
    return [op.name for op in ops]


def test_a_complete_host_plans_no_fetch_no_install_and_no_token():
    ops = plan(model_weights, {**PIN, "hf_token": "hf_plan_4242"}, weights_host(COMPLETE, tools=()))
    assert not [n for n in names(ops) if "fetch" in n or "install" in n or "token" in n]
    assert "hf_plan_4242" not in json.dumps([op.commands for op in ops])


def test_an_unfinished_host_installs_the_cli_writes_the_token_and_fetches_live():
    ops = plan(model_weights, {**PIN, "hf_token": "hf_plan_4242"}, weights_host(UNFINISHED, tools=()))
    assert "model weights | install huggingface_hub==2.4.0 in /opt/glmfleet/huggingface_hub-2.4.0" in names(ops)
    assert f"model weights | hub environment {HUB_ENV_FILE}" in names(ops)
    fetch = [op for op in ops if op.name.startswith("model weights | fetch zai-org/GLM-4-9B-0414@0123456789ab from hf")]
    assert fetch and fetch[0].commands == ["<_run_live>"]  # output shown live: progress, not silence
    assert "hf_plan_4242" not in json.dumps([op.commands for op in ops])


def test_a_lone_peer_host_is_its_own_seed_from_the_origin():
    ops = plan(model_weights, {**PIN, "model_source": "peer", "ssh_hostname": "10.0.0.1"}, weights_host(None))
    assert "model weights | fetch zai-org/GLM-4-9B-0414@0123456789ab from hf" in names(ops)
    # It copies from no peer and no peer copies from it: no transfer key is authorized or handed over.
    assert not [n for n in names(ops) if "transfer key" in n], names(ops)
    assert not [n for n in names(ops) if "install huggingface_hub" in n]  # the fact saw the CLI installed


def test_each_run_plans_its_own_fanout_and_a_complete_group_sets_up_no_transfer():
    """A rollout makes several runs in one process: each plans the fan-out from its own facts.
    A group whose every copy is complete plans no key, host keys or fan-out."""
    peer = {**PIN, "model_source": "peer", "ssh_hostname": "10.0.0.1"}
    assert "model weights | fetch zai-org/GLM-4-9B-0414@0123456789ab from hf" in names(
        plan(model_weights, peer, weights_host(None))
    )
    ops = plan(model_weights, peer, weights_host(COMPLETE))
    assert not [n for n in names(ops) if "key" in n or "fan-out" in n or "fetch" in n], names(ops)


def test_an_unpinned_revision_stops_the_run_before_any_host_is_touched():
    with pytest.raises(ConfigError) as error:
        plan(model_weights, {}, weights_host(None))
    assert "@fake/gpu-1: model_revision is not set" in str(error.value) and "no host was changed" in str(error.value)


def peer_inventory(responses: dict[str, dict]) -> Inventory:
    """@fake peers of one group, each with its weights fact's answer; connected."""
    return connected(
        [
            (
                name,
                {**PIN, "model_source": "peer", "fake_responses": answer, "fake_delay": 0.01, "fake_delay_jitter": 0},
            )
            for name, answer in responses.items()
        ]
    )


def test_the_fanout_asks_every_members_weights_side_by_side(monkeypatch):
    """Where a member's own plan has not begun (a fleet larger than pyinfra's parallel pool),
    the fan-out asks it: all members at once, one round trip for the group, not one each."""
    peers = [f"@fake/gpu-{number}" for number in range(1, 5)]
    inventory = peer_inventory({name: weights_host(COMPLETE) for name in peers})
    state = inventory.state

    def weights_asked() -> int:
        return sum(
            "ssh_host_ed25519_key.pub" in command
            for name in peers
            for command in inventory.get_host(name).connector.executed_commands
        )

    asked_before_the_first_answer = []
    answer = FakeConnector._lookup_response

    def answering(self, command):
        if not asked_before_the_first_answer:
            asked_before_the_first_answer.append(weights_asked())
        return answer(self, command)

    monkeypatch.setattr(FakeConnector, "_lookup_response", answering)
    with ctx_state.use(state), ctx_host.use(inventory.get_host(peers[0])):
        (plan,) = fanout_plans(tools).values()
    assert asked_before_the_first_answer == [len(peers)]
    assert weights_asked() == len(peers)
    assert sorted(plan.facts) == peers and all(fact["complete"] for fact in plan.facts.values())


def test_an_error_asking_a_member_fails_the_fanout_once_without_a_stray_traceback(monkeypatch, capfd):
    """The error reaches this host's planning, which pyinfra reports as planning failed; the
    greenlet that met it prints no traceback of its own."""
    inventory = peer_inventory(
        {
            "@fake/gpu-1": weights_host(COMPLETE),
            "@fake/gpu-2": weights_host({**COMPLETE, "written_by": "a newer glmfleet"}),
        }
    )
    process = ModelWeights.process

    def reading(self, output):
        if any("a newer glmfleet" in line for line in output):
            raise ValueError("a state file this glmfleet cannot read")
        return process(self, output)

    monkeypatch.setattr(ModelWeights, "process", reading)
    with ctx_state.use(inventory.state), ctx_host.use(inventory.get_host("@fake/gpu-1")):
        with pytest.raises(ValueError, match="a state file this glmfleet cannot read"):
            fanout_plans(tools)
    assert "Traceback" not in capfd.readouterr().err

"""What the weights role plans for a host in a given state, against pyinfra's @fake connector
(tests/planning.py): the host's weights fact answers as the real script prints it."""

from __future__ import annotations

import json

import pytest

from glmfleet.config import ConfigError
from roles.model_weights import HF_TOKEN_FILE, model_weights
from tests.planning import plan, sectioned_output

HF = "/opt/glmfleet/huggingface_hub-2.4.0/bin/hf"
PIN = {"model_revision": "0123456789abcdef0123456789abcdef01234567"}


def weights_host(state: dict | None, tools=(HF,)) -> dict:
    """The ModelWeights fact's answer: the host's state file (None: none yet) over a model
    directory with no files, the CLIs installed and the host key."""
    return {"ssh_host_ed25519_key.pub": sectioned_output(
        key="k", tools=list(tools), host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
        state=json.dumps(state, indent=1).splitlines() if state else [], files=[])}


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
    assert "model weights | install huggingface_hub 2.4.0 in /opt/glmfleet/huggingface_hub-2.4.0" in names(ops)
    assert f"model weights | hub token {HF_TOKEN_FILE}" in names(ops)
    fetch = [op for op in ops if op.name.startswith("model weights | fetch zai-org/GLM-4-9B-0414@0123456789ab from hf")]
    assert fetch and fetch[0].commands == ["<_run_live>"]  # output shown live: progress, not silence
    assert "hf_plan_4242" not in json.dumps([op.commands for op in ops])


def test_a_lone_peer_host_is_its_own_seed_from_the_origin():
    ops = plan(model_weights, {**PIN, "model_source": "peer"}, weights_host(None))
    assert "model weights | weights round 1/1" in names(ops)
    assert "model weights | transfer key may read the model directory (rrsync -ro)" in names(ops)
    assert not [n for n in names(ops) if "install huggingface_hub" in n]  # the fact saw the CLI installed


def test_each_run_plans_its_own_fanout_and_a_complete_group_sets_up_no_transfer():
    """A rollout makes several runs in one process: each plans the rounds from its own facts.
    A group whose every copy is complete plans no key, host keys or rounds."""
    peer = {**PIN, "model_source": "peer"}
    assert "model weights | weights round 1/1" in names(plan(model_weights, peer, weights_host(None)))
    ops = plan(model_weights, peer, weights_host(COMPLETE))
    assert not [n for n in names(ops) if "key" in n or "round" in n or "ssh" in n], names(ops)


def test_an_unpinned_revision_stops_the_run_before_any_host_is_touched():
    with pytest.raises(ConfigError) as error:
        plan(model_weights, {}, weights_host(None))
    assert "@fake/gpu-1: model_revision is not set" in str(error.value) and "no host was changed" in str(error.value)

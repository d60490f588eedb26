"""Plan roles against hosts that exist only as canned command output: pyinfra's own ``@fake``
connector answers each fact's command with the output given (real captures where there are
any), and the real roles, operations and fact parsers plan against it. What a real host of
that kind would be told to run is then read back, command by command, without running it."""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.host import Host
from pyinfra.context import ctx_host, ctx_state

from glmfleet.facts.gpu import GpuHost
from roles import prepare_control_node


def sectioned_output(**sections: list[str] | str) -> list[str]:
    """A sectioned fact's output (GpuHost's, ModelWeights'): each section's lines after its marker."""
    output = []
    for name, lines in sections.items():
        output += [f"::glmfleet:: {name}", *([lines] if isinstance(lines, str) else lines)]
    return output


@dataclass
class PlannedOp:
    name: str
    commands: list[str]


def connected(hosts: list[tuple[str, dict]], groups: dict[str, list[str]] | None = None) -> Inventory:
    """An inventory of ``hosts`` (name and data each) and ``groups`` (name to host names), its
    State made and every host connected."""
    inventory = Inventory((hosts, {}), **{name: (members, {}) for name, members in (groups or {}).items()})
    connect_all(State(inventory, Config()))
    return inventory


def fake_host(data: dict, responses: dict, groups: tuple[str, ...] = ()) -> tuple[State, Host]:
    """A connected fake host with ``data``, in inventory ``groups``, whose commands answer with
    ``responses`` (a command substring, or compiled pattern, to its stdout lines), and its State."""
    responses = {**responses, "uname -s": ["Linux"]}
    inventory = connected(
        [
            (
                "@fake/gpu-1",
                {
                    **data,
                    "fake_responses": responses,
                    # no pretended command durations
                    "fake_delay": 0,
                    "fake_delay_jitter": 0,
                },
            )
        ],
        {group: ["@fake/gpu-1"] for group in groups},
    )
    return inventory.state, inventory.get_host("@fake/gpu-1")


def plan(deploy, data: dict, responses: dict, groups: tuple[str, ...] = (), **deploy_kwargs) -> list[PlannedOp]:
    """The operations ``deploy`` plans for one fake host (``fake_host``)."""
    state, host = fake_host(data, responses, groups)
    prepare_control_node(state.inventory)  # as deploy.py does before planning
    add_deploy(state, deploy, **deploy_kwargs)
    with ctx_state.use(state), ctx_host.use(host):
        return list(planned_ops(state, host))


def planned_ops(state: State, host):
    for op_hash in state.get_op_order():
        op_data = state.get_op_data_for_host(host, op_hash)
        if op_data is None:
            continue
        commands = []
        for command in op_data.command_generator():
            if isinstance(command, StringCommand):
                commands.append(command.get_raw_value())
            elif isinstance(command, FunctionCommand):
                commands.append(f"<{command.function.__name__}>")
            else:
                commands.append(f"<{type(command).__name__} {getattr(command, 'dest', '')}>")
        yield PlannedOp(", ".join(sorted(state.op_meta[op_hash].names)), commands)


GPU_HOST_MARKER = "::glmfleet:: os"
assert GPU_HOST_MARKER in GpuHost().command()


# --- hosts of the GPU stack, as their facts answer -------------------------------------------

H100 = "18:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2330] (rev a1)"
NVSWITCH = "05:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:22a3] (rev a1)"
B200 = "18:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2901] (rev a1)"


def gpu_host(
    distro="ubuntu|22.04|jammy",
    kernel="5.15.0-125-generic",
    pci=(H100,),
    module=(),
    secure_boot="SecureBoot disabled",
    headers_candidate="5.15.0-125.135",
    signing_keys=(),
    cuda=(),
):
    return {
        GPU_HOST_MARKER: sectioned_output(
            os=distro,
            arch="amd64",
            kernel=[kernel, "headers"],
            headers_candidate=[headers_candidate],
            pci=list(pci),
            smi=[],
            cuda=list(cuda),
            module=list(module),
            modules=[],
            secure_boot=[secure_boot],
            signing_keys=list(signing_keys),
        )
    }


def installed(*packages: str, held=False) -> dict:
    """dpkg-query's answer listing packages as installed ('name version')."""
    status = "hi " if held else "ii "
    return {"dpkg-query -W -f=": [f"{status} {package}" for package in packages]}

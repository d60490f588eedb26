"""glmfleet's own pyinfra operations, for what pyinfra's built-in ones cannot do safely."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.facts.files import File, Sha256File


@operation()
def secret_file(dest: str, content: str, mode: str = "600", user: str = "root", group: str = "root"):
    """
    Upload a file that holds secrets, never showing its content.

    + dest: remote path; its directory must already exist and be closed to other users
      (connected as root, the upload writes there directly, before the mode is set)
    + content: the file's text
    + mode, user, group: ownership and permissions

    Unlike ``files.put``, nothing of the content reaches pyinfra's output, not even with
    ``--diff``; the change is detected from the sha256 alone.
    """
    data = content.encode()
    remote = host.get_fact(File, path=dest)
    if remote is None or host.get_fact(Sha256File, path=dest) != hashlib.sha256(data).hexdigest():
        yield FileUploadCommand(BytesIO(data), dest)
        remote = None
    if remote is None or (remote.get("user"), remote.get("group")) != (user, group):
        yield StringCommand("chown", f"{user}:{group}", dest)
    if remote is None or remote.get("mode") != int(mode):
        yield StringCommand("chmod", mode, dest)



def _run_live(state, host, command: str, connector_arguments: dict) -> bool:
    status, _ = host.run_shell_command(StringCommand(command), print_output=True, print_input=False, **connector_arguments)
    return status


@operation(is_idempotent=False)
def live_steps(steps: list):
    """
    Run steps and show their output as it comes, whatever pyinfra's verbosity.

    + steps: in order, the first failure fails the operation; each either a shell command for
      the host (str) or ``(function, *args)``, run on the control node as
      ``function(state, host, *args)`` and returning False on failure

    For long transfers (model weights): the person running the deploy sees progress lines
    (bytes, rate, ETA) instead of ten minutes of silence. Output goes to stderr, so ``--json``
    stays clean. Gate it with a fact, as ``server.shell``: it reports a change whenever it runs.
    """
    arguments = host.current_op_global_arguments or {}
    connector_arguments = {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}
    for step in steps:
        if isinstance(step, str):
            yield FunctionCommand(_run_live, (step, connector_arguments), {})
        else:
            yield FunctionCommand(step[0], step[1:], {})

"""glmfleet's own pyinfra operations, for what pyinfra's built-in ones cannot do safely."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
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

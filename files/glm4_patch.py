#!/usr/bin/env python3
"""Fix a known-broken vLLM file with a patch, safely: glmfleet uses it for vLLM 0.8.4's glm4.py
(the GLM-4-0414 models). roles/glm4_patch.py passes the release and the two sha256 sums.

    python glm4_patch.py apply --vllm 0.8.4 --original SHA --patched SHA PATCH
        (run by a venv's python: patches that venv's vLLM)
    python glm4_patch.py derive --original SHA --patched SHA PATCH INPUT OUTPUT
        (writes a patched copy of INPUT, e.g. the file copied out of a container image)

Only a file with the original sha256 is patched, and the result must have the patched sha256;
anything else is refused with nothing changed. ``apply`` leaves every other vLLM release alone,
keeps the original beside the file as glm4.py.orig (to revert: move it back) and changes
nothing on a second run. Stdlib and GNU patch only. Exit 0: patched, or nothing to do (the
last line says which); 1: refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MODULE = "vllm/model_executor/models/glm4.py"


class Refused(Exception):
    """The file is not what the patch was written for: nothing was changed."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patched_copy(args, original: Path, output: Path) -> None:
    """Write the patched original to output, atomically, or raise with output untouched."""
    if sha256(original) != args.original:
        raise Refused(
            f"{original} has sha256 {sha256(original)}, not the original {args.original} the patch is for: "
            "give it the file as vLLM ships it"
        )
    partial = output.with_name(f".{output.name}.glmfleet-partial")
    try:
        subprocess.run(
            [
                "patch",
                "--silent",
                "--forward",
                "--reject-file=-",
                "--output",
                str(partial),
                str(original),
                str(args.patch),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise Refused("GNU patch is not installed (Debian and Ubuntu: apt-get install patch)") from None
    except subprocess.CalledProcessError as error:
        partial.unlink(missing_ok=True)
        raise Refused(f"patch failed on {original}: {error.stdout}{error.stderr}".strip()) from None
    if sha256(partial) != args.patched:
        found = sha256(partial)
        partial.unlink()
        raise Refused(f"the patched file has sha256 {found}, not the expected {args.patched}")
    shutil.copymode(original, partial)
    os.replace(partial, output)


def apply(args) -> str:
    """Patch glm4.py of the vLLM installed for this python."""
    try:
        vllm = metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        raise Refused(f"no vllm is installed for {sys.executable}") from None
    if vllm.version != args.vllm:
        return f"vLLM {vllm.version}: only {args.vllm} needs the patch; left untouched"
    target = Path(vllm.locate_file(MODULE))
    found = sha256(target)
    if found == args.patched:
        return f"{target} is already patched"
    if found != args.original:
        raise Refused(
            f"{target} has sha256 {found}, neither vLLM {args.vllm}'s original {args.original} nor the patched "
            f"{args.patched}: it was changed by something else; reinstall vLLM (rebuild the venv) and run again"
        )
    kept = target.with_name(target.name + ".orig")
    if not kept.exists() or sha256(kept) != args.original:
        partial = kept.with_name(f".{kept.name}.glmfleet-partial")
        shutil.copy2(target, partial)
        os.replace(partial, kept)
    patched_copy(args, kept, target)
    return f"{target} patched (sha256 {args.patched}); the original is kept as {kept}"


def derive(args) -> str:
    patched_copy(args, args.input, args.output)
    return f"{args.output} written from {args.input} (sha256 {args.patched})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    for name, action in (("apply", apply), ("derive", derive)):
        sub = actions.add_parser(name)
        sub.set_defaults(run=action)
        if name == "apply":
            sub.add_argument("--vllm", required=True, help="the one vLLM release the patch is for")
        sub.add_argument("--original", required=True, help="sha256 of the file the patch is for")
        sub.add_argument("--patched", required=True, help="sha256 the patched file must have")
        sub.add_argument("patch", type=Path)
        if name == "derive":
            sub.add_argument("input", type=Path)
            sub.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except Refused as refusal:
        print(f"refused, nothing changed: {refusal}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Check a `vllm serve` command line against the installed vLLM's own argument parser: nothing
starts, no model loads, no GPU is needed.

Run it with the python of the venv that holds vLLM:

    python check_vllm_flags.py MODEL [FLAGS...]     # what follows `vllm serve`
    python check_vllm_flags.py --guard '{"flags": [...], "extra_from": N}' -- MODEL [FLAGS...]
    python check_vllm_flags.py --many < commands.json

Exit 0: vLLM accepts the command (what it warns about, deprecated flags say, is printed).
Exit 2: vLLM refuses it; the last line gives vLLM's own message. Exit 1: the parser could not
be built. With ``--guard``, the arguments from index ``extra_from`` on (the operator's extra
flags) must not change what any of ``flags`` sets, however they spell it (``--api_key``, an
abbreviation, a ``--config`` file): vLLM's parser reads the command with and without them and
the two must agree on those flags. ``--many`` reads a JSON list of such argument lists and prints one JSON object per
command ({"argv", "ok", "message"}), so the slow import of vLLM is paid once.

Without a GPU, vLLM cannot infer its platform and its CLI fails before parsing ("Failed to
infer device type"). Its own `vllm bench` then falls back to the CPU platform; this does the
same, which changes no flag: the serve parser is built from vLLM's argument classes either way.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def build_parser():
    """vLLM's `vllm serve` parser, built the way its CLI builds it: a `vllm` parser with the
    serve subcommand's own subparser_init."""
    from vllm import platforms

    if type(platforms.current_platform).__name__ == "UnspecifiedPlatform":
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()
    from vllm.entrypoints.cli import serve

    command = serve.cmd_init()[0]
    parser = serve.FlexibleArgumentParser(prog="vllm")
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    return parser, command


def registered(manager, table: str) -> set[str]:
    """Parser names a registry knows: list_registered() in newer vLLM, a class dict in 0.8."""
    return set(manager.list_registered()) if hasattr(manager, "list_registered") else set(getattr(manager, table))


def check_parsers(args) -> None:
    """vLLM checks parser names only when the server starts (the tool parser has no argparse
    choices): check them against this vLLM's registries now."""
    from vllm.reasoning import ReasoningParserManager

    try:  # vLLM 0.12 on
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        from vllm.entrypoints.openai.cli_args import ToolParserManager

    tool = getattr(args, "tool_call_parser", None)
    if tool and not getattr(args, "tool_parser_plugin", None):
        known = registered(ToolParserManager, "tool_parsers")
        if tool not in known:
            raise ValueError(f"invalid tool call parser: {tool} (choose from {', '.join(sorted(known))})")
    reasoning = getattr(args, "reasoning_parser", None)
    if reasoning and not getattr(args, "reasoning_parser_plugin", None):
        known = registered(ReasoningParserManager, "reasoning_parsers")
        if reasoning not in known:
            raise ValueError(f"invalid reasoning parser: {reasoning} (choose from {', '.join(sorted(known))})")


def guarded_dests(parser, flags: list[str]) -> dict[str, str]:
    """The destinations of ``flags`` in vLLM's serve parser, each with the flag that names it."""
    serve = next(action for action in parser._actions if getattr(action, "choices", None) and "serve" in action.choices)
    found = {}
    for action in serve.choices["serve"]._actions:
        for flag in action.option_strings:
            if flag in flags:
                found[action.dest] = flag
    return found


def check_guard(parser, argv: list[str], guard: dict) -> None:
    """Refuse extra arguments that set a flag glmfleet's own keys set (``guard``)."""
    dests = guarded_dests(parser, guard["flags"])
    ours = vars(parser.parse_args(["serve", *argv[: guard["extra_from"]]]))
    everything = vars(parser.parse_args(["serve", *argv]))
    changed = sorted(flag for dest, flag in dests.items() if ours.get(dest) != everything.get(dest))
    if changed:
        raise ValueError(
            f"vllm_extra_args set {', '.join(changed)}, which glmfleet's own keys set: set those keys instead "
            "(vllm_api_key for --api-key: a key on the command line is visible to every user)"
        )


def check(parser, command, argv: list[str], output: io.StringIO, guard: dict | None = None) -> tuple[bool, str]:
    """(accepted, message): vLLM's error line, or its warnings about this command."""
    start = output.tell()
    try:
        args = parser.parse_args(["serve", *argv])
        command.validate(args)
        check_parsers(args)
        if guard is not None:
            check_guard(parser, argv, guard)
    except SystemExit:
        errors = [line for line in output.getvalue()[start:].splitlines() if ": error: " in line]
        return False, errors[-1] if errors else "vLLM's parser refused the command"
    except (TypeError, ValueError, KeyError) as error:
        return False, str(error).strip("'\"")
    warnings = [line for line in output.getvalue()[start:].splitlines() if "deprecated" in line.lower()]
    return True, "; ".join(warnings) or "accepted"


def main(argv: list[str]) -> int:
    guard = None
    if argv[:1] == ["--guard"]:
        guard, argv = json.loads(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:]
    commands = json.load(sys.stdin) if argv[:1] == ["--many"] else [argv]
    output = io.StringIO()  # vLLM logs to stdout and argparse to stderr: keep both for the report
    failure = None
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            parser, command = build_parser()
            results = [(candidate, *check(parser, command, candidate, output, guard)) for candidate in commands]
        except Exception as error:  # an import or build failure is not a verdict on the flags
            failure = f"could not build vLLM's serve parser: {type(error).__name__}: {error}"
    if failure:
        print(output.getvalue()[-2000:], failure, sep="\n")
        return 1
    from importlib.metadata import version

    for candidate, ok, message in results:
        if argv[:1] == ["--many"]:
            print(json.dumps({"argv": candidate, "ok": ok, "message": message}))
        else:
            print(f"vLLM {version('vllm')} {'accepts' if ok else 'refuses'} the command: {message}")
    return 0 if all(ok for _, ok, _ in results) else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

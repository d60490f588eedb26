"""The `vllm` console script of the TEST DOUBLE: `vllm --version` and `vllm serve`."""

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import vllm_test_double
from vllm_test_double.group import Group, membership
from vllm_test_double.server import DoubleHTTPServer, EngineState, ServeConfig

log = logging.getLogger("vllm_test_double")

ENV_STARTUP_DELAY = "VLLM_TEST_DOUBLE_STARTUP_DELAY"
ENV_FAIL = "VLLM_TEST_DOUBLE_FAIL"
ENV_LATENCY = "VLLM_TEST_DOUBLE_LATENCY"
FAIL_MODES = ("exit", "unhealthy", "error")
# The real vLLM reads it from the model's config; the double has no model to read.
DEFAULT_MAX_MODEL_LEN = 8192
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

SERVE_EPILOG = f"""\
Unrecognized flags are accepted and logged, so flags this double does not
model do not stop a unit from starting. The double cannot know whether an
unrecognized flag takes a value, so give MODEL first or such flags as
--flag=value; otherwise the value may be taken for MODEL.

Test knobs (environment):
  {ENV_STARTUP_DELAY}=SECONDS
      bind the port at once but answer /health with 503 (and /v1 with 503)
      until SECONDS have passed, as real vLLM does while it loads the model.
  {ENV_FAIL}=exit|unhealthy|error
      exit:      exit with status 1 after the startup delay (engine crash at load).
      unhealthy: never finish loading: /health and /v1 keep answering 503.
      error:     load normally, but every completion answers 500 (a wedged engine).
  {ENV_LATENCY}=SECONDS
      hold each completion this long, so requests are in flight during drains.
  VLLM_API_KEY=KEY
      require `Authorization: Bearer KEY` on /v1, unless --api-key is given.
"""


@dataclass(frozen=True)
class DoubleKnobs:
    """The VLLM_TEST_DOUBLE_* settings that script how the double misbehaves."""

    startup_delay_s: float
    latency_s: float
    fail: str | None

    @classmethod
    def from_env(cls, env) -> "DoubleKnobs":
        fail = env.get(ENV_FAIL) or None
        if fail is not None and fail not in FAIL_MODES:
            raise ValueError(f"{ENV_FAIL}={fail!r}: expected one of {', '.join(FAIL_MODES)}")
        return cls(_seconds(env, ENV_STARTUP_DELAY), _seconds(env, ENV_LATENCY), fail)


def _seconds(env, name: str) -> float:
    raw = env.get(name) or "0"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an unknown flag that happens to prefix a known one
    # (say --reasoning) must be recorded as unknown, not silently taken for it.
    parser = argparse.ArgumentParser(
        prog="vllm",
        description=vllm_test_double.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=vllm_test_double.__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible API (TEST DOUBLE: no model is loaded)",
        description="TEST DOUBLE of `vllm serve`: it stands in for vLLM and serves no model;\n"
        "completions echo the last user message.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    serve.add_argument("model_tag", nargs="?", metavar="MODEL", help="model to pretend to serve")
    serve.add_argument("--model", help="the same as MODEL (MODEL wins when both are given)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name", nargs="+", metavar="NAME", help="names the API answers to (default: MODEL)"
    )
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument(
        "--api-key", nargs="+", metavar="KEY", help="require one of these keys on /v1 (beats VLLM_API_KEY)"
    )
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument("--tool-call-parser")
    serve.add_argument("--reasoning-parser")
    serve.add_argument("--enable-auto-tool-choice", action="store_true")
    # vLLM's multi-node runtime (vllm_test_double.group imitates what a deployer sees of it).
    serve.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    serve.add_argument("--nnodes", "-n", type=int, default=1)
    serve.add_argument("--node-rank", "-r", type=int, default=0)
    serve.add_argument("--master-addr", default="127.0.0.1")
    serve.add_argument("--master-port", type=int, default=29501)
    serve.add_argument("--headless", action="store_true", help="serve no API: a rank of a group, not its head")
    serve.add_argument("--distributed-timeout-seconds", type=float)
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    serve.add_argument("--data-parallel-size-local", "-dpl", type=int)
    serve.add_argument("--data-parallel-start-rank", "-dpr", type=int)
    serve.add_argument("--data-parallel-address", "-dpa")
    serve.add_argument("--data-parallel-rpc-port", "-dpp", type=int, default=29550)
    serve.add_argument("--data-parallel-hybrid-lb", "-dph", action="store_true")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, stop accepting connections and let in-flight requests finish for up to SECONDS "
        "(default: exit at once)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(levelname)s %(asctime)s [%(module)s] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )
    return serve(parser, args, unrecognized)


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace, unrecognized: list[str]) -> int:
    model = args.model_tag or args.model
    if not model:
        parser.error("serve: a MODEL (or --model) is required")
    if args.model and model != args.model:
        # Often the value of an unrecognized flag, taken for MODEL (see --help).
        log.warning("MODEL %r overrides --model %r, as in vLLM", model, args.model)
    try:
        knobs = DoubleKnobs.from_env(os.environ)
    except ValueError as error:
        log.error("%s", error)
        return 2
    # vLLM's precedence: the flag beats the environment.
    api_keys = args.api_key or ([os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else [])
    config = ServeConfig(
        model=model,
        served_model_names=args.served_model_name or [model],
        max_model_len=args.max_model_len,
        api_keys=api_keys,
        latency_s=knobs.latency_s,
        fail_requests=knobs.fail == "error",
        version=vllm_test_double.__version__,
    )

    log.info(
        "Starting vLLM test double %s -- a TEST DOUBLE that stands in for vLLM and serves no model", config.version
    )
    log.info("args: %s", _loggable_args(args))
    log.info("test knobs: %s", knobs)
    if unrecognized:
        log.warning("Accepted unrecognized arguments (recorded, not acted on): %s", " ".join(unrecognized))

    # Stop signals are blocked before any thread starts, so every thread
    # inherits the mask and only the sigwait calls below receive them; no
    # signal handler can interrupt a thread that holds a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    member = membership(args)
    group = Group(member) if member else None
    if args.headless:
        if group is None or member.is_head:
            log.error("--headless runs a rank of a multi-node group: give --nnodes and a --node-rank above 0")
            return 2
        log.info(
            "Launching vLLM (test double) headless rank %d, head at %s:%d", member.rank, member.address, member.port
        )
        return _run_headless(group, knobs)
    state = EngineState()
    try:
        # Bound before the engine "loads", as vLLM binds its port early; a head listens only once
        # its group has joined.
        server = DoubleHTTPServer((args.host, args.port), config, state, listen=group is None)
    except OSError as error:
        log.error("Could not bind %s:%s: %s", args.host, args.port, error)
        return 1
    try:
        if group is not None:
            joined = _wait_for(group.join)
            if joined is None:
                return 0
            if not joined:
                return 1
            server.server_activate()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True).start()
        log.info("Starting vLLM API server (test double) on http://%s:%d", args.host, server.server_address[1])
        return _run_engine(server, state, knobs, args.shutdown_timeout, group)
    finally:
        server.server_close()
        if group is not None:
            group.close()


def _wait_for(join) -> bool | None:
    """Run ``join`` while stop signals are honoured: its result, or None on a stop signal."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(join()), name="group-join", daemon=True)
    thread.start()
    while thread.is_alive():
        if signal.sigtimedwait(STOP_SIGNALS, 0.2) is not None:
            log.info("Stopped while the group was joining")
            return None
    return result[0]


def _run_headless(group: Group, knobs: DoubleKnobs) -> int:
    joined = _wait_for(group.join)
    if not joined:
        return 0 if joined is None else 1
    if knobs.fail == "exit":
        signum = _wait_for_stop(group, knobs.startup_delay_s)
        if signum is None:
            log.error("RuntimeError: WorkerProc initialization failed (%s=exit)", ENV_FAIL)
            return 1
    else:
        signum = _wait_for_stop(group)
    if signum is None:
        log.error("RuntimeError: %s", group.why)
        return 1
    log.info("Received %s, shutting down", signal.Signals(signum).name)
    group.close()
    return 0


def _wait_for_stop(group: Group | None, seconds: float | None = None):
    """The stop signal received within ``seconds`` (None: no limit), or None once the group
    lost a member (or the time passed)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while group is None or not group.lost.is_set():
        left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if left <= 0:
            return None
        received = signal.sigtimedwait(STOP_SIGNALS, left)
        if received is not None:
            return received.si_signo
    return None


def _run_engine(
    server: DoubleHTTPServer,
    state: EngineState,
    knobs: DoubleKnobs,
    shutdown_timeout_s: float | None,
    group: Group | None = None,
) -> int:
    signum = _wait_for_stop(group, knobs.startup_delay_s)
    if signum is None and group is not None and group.lost.is_set():
        log.error("RuntimeError: Engine core initialization failed: %s", group.why)
        return 1
    if signum is None:
        if knobs.fail == "exit":
            log.error("RuntimeError: Engine core initialization failed (%s=exit)", ENV_FAIL)
            return 1
        if knobs.fail != "unhealthy":
            state.loaded.set()
            log.info("Application startup complete.")
        signum = _wait_for_stop(group)
        if signum is None:
            log.error("RuntimeError: the engine died: %s", group.why)
            return 1
    log.info("Received %s, shutting down", signal.Signals(signum).name)
    server.shutdown()
    server.server_close()  # new connections are refused from here on
    if shutdown_timeout_s is not None:
        log.info("Draining: waiting up to %gs for in-flight requests", shutdown_timeout_s)
        left = server.wait_until_idle(shutdown_timeout_s)
        if left:
            log.warning("%d request(s) still in flight after %gs; exiting anyway", left, shutdown_timeout_s)
    return 0


def _loggable_args(args: argparse.Namespace) -> dict:
    shown = {key: value for key, value in vars(args).items() if key != "command"}
    if shown.get("api_key"):
        shown["api_key"] = "<redacted>"
    return shown

"""``pagedjax <command>``: generate, serve, plan, top. Each command module exposes
``add_arguments(parser)`` and ``run(args)``; a module may also expose ``check(args)``, which
validates the flags before anything heavy is imported or loaded (a bad value fails at once).

Logging: WARNING for everything, INFO for pagedjax's own loggers, except ``generate``, which
prints only the answer unless ``-v``. JAX's INFO lines (the backends it tried) stay hidden.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": ("pagedjax.entrypoints.generate", "generate text from a prompt (the main job)"),
    "serve": ("pagedjax.entrypoints.server", "OpenAI-compatible HTTP server"),
    "plan": ("pagedjax.planning.planner", "capacity planner and memory report"),
    "top": ("pagedjax.entrypoints.top", "live terminal view of a running server's KV memory"),
}
QUIET = ("generate",)  # commands whose output is the answer: no INFO lines without -v
RUNS_ENGINE = ("generate", "serve")  # commands that size a KV pool on this device


def setup_logging(verbose: bool) -> None:
    # timestamped, as vLLM's: a server's log says when each start-up phase and request happened
    logging.basicConfig(level=logging.WARNING, datefmt="%m-%d %H:%M:%S",
                        format="%(levelname)s %(asctime)s.%(msecs)03d %(name)s: %(message)s")
    logging.getLogger("pagedjax").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pagedjax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / the error
        return None
    command = argv[0]
    module = importlib.import_module(COMMANDS[command][0])
    p = argparse.ArgumentParser(prog=f"pagedjax {command}", description=COMMANDS[command][1])
    module.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log the engine's start-up and progress (INFO)"
                        if command in QUIET else "also log JAX's INFO lines")
    args = p.parse_args(argv[1:])
    setup_logging(args.verbose or command not in QUIET)
    if args.verbose and command not in QUIET:
        logging.getLogger().setLevel(logging.INFO)
    try:
        if hasattr(module, "check"):
            module.check(args)
        from pagedjax.config import EngineArgs

        if command in RUNS_ENGINE:
            EngineArgs.from_namespace(args)  # every engine flag checked before a model loads
            from pagedjax.worker.device_memory import configure_allocator

            configure_allocator(args.gpu_memory_utilization)  # before JAX starts a backend
        from pagedjax.worker.distributed import maybe_initialize

        maybe_initialize(args)  # before anything touches a device
        return module.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        p.exit(2, f"pagedjax {command}: error: {e}\n")


if __name__ == "__main__":
    main()

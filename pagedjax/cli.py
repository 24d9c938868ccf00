"""``pagedjax <command>``: generate, serve, plan. Each command module exposes
``add_arguments(parser)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": ("pagedjax.generate", "generate text from a prompt (the main job)"),
    "serve": ("pagedjax.server", "OpenAI-compatible HTTP server"),
    "plan": ("pagedjax.planner", "capacity planner and memory report"),
}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pagedjax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / the error
        return None
    module = importlib.import_module(COMMANDS[argv[0]][0])
    p = argparse.ArgumentParser(prog=f"pagedjax {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(p)
    args = p.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pagedjax.distributed import maybe_initialize

        maybe_initialize(args)  # before anything touches a device
        return module.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        p.exit(2, f"pagedjax {argv[0]}: error: {e}\n")


if __name__ == "__main__":
    main()

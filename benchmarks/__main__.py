"""``python -m benchmarks <scenario> [--help]``. Each scenario is a module exposing
``add_arguments(parser)`` and ``run(args) -> dict`` (the summary)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from benchmarks.common import set_argv

SCENARIOS = {
    "host-overhead": "benchmarks.host_overhead",
    "step-profile": "benchmarks.step_profile",
    "kernel": "benchmarks.kernel",
    "latency": "benchmarks.latency",
    "throughput": "benchmarks.throughput",
    "capacity": "benchmarks.capacity",
    "native-vs-paged": "benchmarks.native_vs_paged",
    "beam": "benchmarks.beam",
    "swap": "benchmarks.swap",
    "serve": "benchmarks.serve",
    "prefix": "benchmarks.prefix",
    "small-memory": "benchmarks.small_memory",
    "startup": "benchmarks.startup",
    "kv-offload": "benchmarks.kv_offload",
    "long-context": "benchmarks.long_context",
}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="scenario", required=True)
    available = {}
    for name, mod in SCENARIOS.items():
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # scenario not written yet
                continue
            raise
        available[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    set_argv(argv)
    logging.basicConfig(level=logging.INFO, datefmt="%m-%d %H:%M:%S",
                        format="%(levelname)s %(asctime)s.%(msecs)03d %(name)s: %(message)s")
    if hasattr(args, "gpu_memory_utilization"):  # the scenario starts engines on this device
        from pagedjax.worker.device_memory import configure_allocator

        configure_allocator(args.gpu_memory_utilization)  # before JAX starts a backend
    from pagedjax.worker.distributed import maybe_initialize

    maybe_initialize(args)  # before anything touches a device
    return available[args.scenario].run(args)


if __name__ == "__main__":
    main()

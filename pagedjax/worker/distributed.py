"""Multi-host: ``--distributed`` joins this process to a JAX cluster (``jax.distributed``), after
which ``jax.devices()`` lists every host's devices and ``--tensor-parallel-size`` can span them.

Design: every process runs the same program, host side included. The scheduler, block manager and
runner ``prepare()`` are deterministic functions of the requests (seeds come from
``--seed``, never from the clock), and the step's sampled tokens come back *replicated* (the
runner's ``out_shardings``), so every process postprocesses identical values and its host state
stays identical to process 0's. This is JAX's multi-controller model as it is meant to be used: each
process must issue the same jitted computations in the same order anyway (the step, swap gathers
and scatters, block copies); replicating the host loop gets that for free, where a process-0
scheduler broadcasting its step array would need a second protocol mirroring every one of those
calls, plus a collective per step. What it requires: every process is given the same requests in
the same order, as an offline script (``LLM.generate``, the benchmarks) is. A server whose HTTP
front end runs on process 0 alone would broadcast the *requests* (not the steps) to the others;
that is not built yet.

On the CPU the cross-process collectives are Gloo's (``jax_cpu_collectives_implementation``,
the default in jax 0.10), which is what the two-process test on 127.0.0.1 runs on.
"""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed (multi-host)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process JAX cluster (jax.distributed.initialize) before "
                        "anything runs; the options below default to JAX's own detection "
                        "(SLURM, Open MPI, Kubernetes, TPU, or JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0's coordinator, e.g. 10.0.0.1:1234")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize``, with errors that say what to pass. Must run before any JAX
    computation in this process."""
    import jax

    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes {num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes}) for "
                         f"--num-processes {num_processes}")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except ValueError as e:
        raise ValueError(f"--distributed: {e}; pass --coordinator-address, --num-processes and "
                         f"--process-id when no cluster manager sets them") from None
    logger.info("distributed: process %d of %d, %d local / %d global %s devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count(), jax.devices()[0].platform)


def maybe_initialize(args: argparse.Namespace) -> None:
    """Call from an entry point right after parsing its flags."""
    if getattr(args, "distributed", False):
        initialize(args.coordinator_address, args.num_processes, args.process_id)

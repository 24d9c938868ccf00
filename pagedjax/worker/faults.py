"""What the engine does when the device fails: a failed step costs its own requests, no others.

A device step can fail after the KV pool was donated to it (an XLA runtime error, an
allocation the device could not make, a lost transfer): the runner's pool then points at deleted
buffers, or at the poisoned output of the failed step. A poisoned output is not a one-off: every
program that reads it fails with "Error dispatching computation: <its error>" and poisons its own
outputs in turn, so every device array a failed step wrote (the pool, and the sampled-token
buffer the next step reads its async PLACEHOLDER tokens from) must be replaced, or no later
step can succeed. Recovery is therefore a reset: the step's requests finish with an error, every
other sequence is recomputed (the host side: ``Scheduler.fail``), and the runner's device state
is allocated afresh here with the same shapes and shardings (so the compiled step is reused) and
waited for. ``engine.fault`` names the error while
the engine cannot serve (the server's /health answers 503); it is cleared once the reset
succeeded. If the reset itself fails the error propagates: the engine is then beyond repair, and
the server reports itself dead.

Out-of-memory at start is turned into an error that says which flags to change.
"""
from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp

from pagedjax.worker.kv_pool import GiB, KVPoolSpec

logger = logging.getLogger(__name__)

OOM_HINT = ("lower --gpu-memory-utilization (or set --num-gpu-blocks-override) to leave the "
            "compiler more room, or lower --max-model-len / --max-num-batched-tokens / "
            "--max-num-seqs to shrink the step")


class DeviceOutOfMemoryError(ValueError):
    """The device ran out of memory while the engine started; the message says what to change."""


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


@contextlib.contextmanager
def explain_oom_at_start(what: str, spec: KVPoolSpec, max_model_len: int):
    """Re-raise an out-of-memory error from the block as a DeviceOutOfMemoryError (a ValueError:
    the CLI prints it without a traceback)."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceOutOfMemoryError(
            f"out of device memory while {what} (KV pool: {spec.num_blocks} blocks, "
            f"{spec.total_bytes / GiB:.2f} GiB; --max-model-len {max_model_len}): "
            f"{OOM_HINT}. The device said: {e}") from e


def describe(error: Exception) -> str:
    """What a failed device step's requests are told."""
    message = f"the device step failed: {type(error).__name__}: {error}"
    return message + f" ({OOM_HINT})" if is_out_of_memory(error) else message


def reset_device(runner) -> None:
    """Replace every device array a failed step may have poisoned (the pool, the sampled-token
    buffer) with fresh ones of the same shapes and shardings, and wait until they exist."""
    runner.pool = fresh_pool(runner.pool)
    runner.reset_sampled()
    jax.block_until_ready((runner.pool, runner._sampled))  # the device can serve again
    logger.warning("KV pool and sampled-token buffer reallocated")


def fresh_pool(old):
    """Zeros shaped, typed, sharded and committed like ``old`` (the step's jit cache keys on all
    four, so the compiled step is reused); ``old``'s live buffers are freed first, so the device
    never holds two pools."""
    leaves, tree = jax.tree.flatten(old)
    specs = [(x.shape, x.dtype, x.sharding, x._committed) for x in leaves]  # no public flag
    for x in leaves:
        if not x.is_deleted():
            x.delete()
    return jax.tree.unflatten(tree, [jnp.zeros(shape, dtype, device=sharding if committed else None)
                                     for shape, dtype, sharding, committed in specs])

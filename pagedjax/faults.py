"""What the engine does when the device fails: a failed step costs its own requests, no others.

A device step can fail after the KV pool was donated to it (an XLA runtime error, an
allocation the device could not make, a lost transfer): the runner's pool then points at deleted
buffers, or at the poisoned output of the failed step. A poisoned output is not a one-off: every
program that reads it fails with "Error dispatching computation: <its error>" and poisons its own
outputs in turn, so every device array a failed step wrote (the pool, and the sampled-token
buffer the next step reads its async PLACEHOLDER tokens from) must be replaced, or no later
step can succeed. Recovery is therefore a reset: the step's requests finish with an error (their
blocks freed), every other sequence goes back to the front of the waiting queue to be recomputed
(its generated tokens kept, as after a recompute preemption), cached prefixes and pending block
copies are forgotten, and the runner's device state is allocated afresh with the same shapes and
shardings (so the compiled step is reused) and waited for. ``engine.fault`` names the error while
the engine cannot serve (the server's /health answers 503); it is cleared once the reset
succeeded. If the reset itself fails the error propagates: the engine is then beyond repair, and
the server reports itself dead.

Out-of-memory at start is turned into an error that says which flags to change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from .kv_pool import GiB, KVPoolSpec
from .outputs import RequestOutput
from .sequence import Status

if TYPE_CHECKING:
    from .engine import LLMEngine
    from .scheduler import ScheduledBatch

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


def fail_step(engine: "LLMEngine", batches: "list[ScheduledBatch]",
              error: Exception) -> list[RequestOutput]:
    """A device step raised ``error`` while ``batches`` were on the device (with async
    scheduling, the one running and the one queued behind it): finish their requests with
    ``finish_reason="error"`` and reset the device state. Returns their final outputs, each with
    ``error`` set."""
    message = f"the device step failed: {type(error).__name__}: {error}"
    if is_out_of_memory(error):
        message += f" ({OOM_HINT})"
    engine.fault = message
    failed = list(dict.fromkeys(s.request_id for b in batches for s in b.seqs))
    logger.error("%s; failing %d request(s) of the step, recomputing the rest", message,
                 len(failed), exc_info=error)
    now = time.time()
    outputs = []
    for rid in failed:
        req = engine.end_request(rid, "error")
        if req is None:
            continue
        for seq in req.seqs:  # tokens the failed step was to sample never came
            if seq.num_pending:
                del seq.output_token_ids[-seq.num_pending:]
                seq.num_pending = 0
        req.metrics.finished_time = now
        out = engine._output(req)
        outputs.append(dataclasses.replace(out, finished=True, error=message))
    reset_device_state(engine)
    return outputs


def reset_device_state(engine: "LLMEngine") -> None:
    """Every KV block is lost: recompute every surviving sequence into a fresh pool."""
    sched, bm = engine.scheduler, engine.block_manager
    survivors = sorted([*sched.running, *sched.swapped], key=lambda s: s.arrival)
    for seq in [*survivors, *sched.waiting]:
        bm.free(seq.seq_id)
        if sched.swap is not None:
            sched.swap.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
    sched.running.clear()
    sched.swapped.clear()
    sched.waiting.extendleft(reversed(survivors))  # oldest first, ahead of new prompts
    sched.num_preemptions += len(survivors)
    sched.num_preemptions_recompute += len(survivors)
    bm.pending_copies = []
    bm.drop_cache()
    if bm.num_free != bm.num_blocks:
        raise RuntimeError(f"{bm.num_blocks - bm.num_free} KV blocks are still held by no live "
                           "sequence after a failed step; the engine cannot recover")
    runner = engine.runner
    runner.pool = fresh_pool(runner.pool)
    runner.reset_sampled()
    jax.block_until_ready((runner.pool, runner._sampled))  # the device can serve again
    engine.fault = None
    logger.warning("KV pool and sampled-token buffer reallocated; %d sequence(s) will be "
                   "recomputed", len(survivors))


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

"""One snapshot of the engine's counters and gauges (vLLM v1's ``make_stats``).

The counters live where they are counted (the engine's ``EngineStats`` below, the scheduler's
preemptions, the block manager's prefix-cache lookups, the runner's compilations, the host pool's
swap traffic); ``LLMEngine.make_stats()`` gathers them into one frozen ``EngineSnapshot`` that the
server's metrics and log line, and the benchmarks, read. Counters are cumulative since the engine
started: a reader that wants a rate or a delta subtracts two snapshots (``delta``).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineStats:
    """The engine's own counters, written as it steps (every one is a field of the snapshot)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model, recompute included
    steps: int = 0
    host_seconds: float = 0.0  # schedule + prepare + update (and the step's bookkeeping)
    device_seconds: float = 0.0  # dispatch until the sampled tokens are on the host
    schedule_seconds: float = 0.0  # Scheduler.schedule: the batch and its host arrays
    prepare_seconds: float = 0.0  # ModelRunner.prepare: padding into a bucket
    update_seconds: float = 0.0  # Scheduler.update_from_output


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    # gauges
    num_running: int = 0  # sequences on the device
    num_waiting: int = 0
    num_swapped: int = 0  # sequences whose blocks are in host memory
    kv_cache_usage: float = 0.0  # share of the device pool's blocks in use
    cpu_cache_usage: float = 0.0  # share of the host tier in use (swapped and cached blocks)
    kv_offload_usage: float = 0.0  # share of the host tier the host prefix cache holds
    kv_offload_blocks: int = 0  # blocks in the host prefix cache (--kv-offloading-size)
    # counters: EngineStats's (meanings there), then the other parts'
    prompt_tokens: int = 0
    generation_tokens: int = 0
    computed_tokens: int = 0
    steps: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0
    schedule_seconds: float = 0.0
    prepare_seconds: float = 0.0
    update_seconds: float = 0.0
    num_preemptions: int = 0
    num_preemptions_swap: int = 0
    num_preemptions_recompute: int = 0
    prefix_cache_queries: int = 0  # tokens looked up (--enable-prefix-caching)
    prefix_cache_hits: int = 0  # tokens found
    num_compilations: int = 0  # step programs compiled, --precompile's included
    swap_out_blocks: int = 0  # swap traffic recorded so far (a swap in flight counts on landing)
    swap_in_blocks: int = 0
    kv_offload_queries: int = 0  # tokens looked up on the host tier (GPU prefix-cache misses)
    kv_offload_hits: int = 0  # tokens found there (loaded instead of recomputed)
    kv_offload_store_blocks: int = 0  # blocks copied to the host tier (recorded on landing)
    kv_offload_store_payload_bytes: int = 0
    kv_offload_store_seconds: float = 0.0  # the copies' time: bytes / seconds is their GB/s
    kv_offload_load_blocks: int = 0  # blocks copied back to the device
    kv_offload_load_payload_bytes: int = 0
    kv_offload_load_seconds: float = 0.0

    def delta(self, before: "EngineSnapshot") -> dict:
        """Each counter's change since ``before`` (the gauges as they are now)."""
        gauges = {"num_running", "num_waiting", "num_swapped", "kv_cache_usage", "cpu_cache_usage",
                  "kv_offload_usage", "kv_offload_blocks"}
        return {f.name: getattr(self, f.name) - (0 if f.name in gauges else getattr(before, f.name))
                for f in dataclasses.fields(self)}

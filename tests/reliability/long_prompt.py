"""Run in its own process by test_long_prompt.py (peak RSS is a per-process figure): the default
engine (embedded SmolLM2, default config) completes a prompt of max_model_len - 1 tokens. Prints
one JSON line with the memory figures."""
from __future__ import annotations

import json
import re
import time


def status_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10


def rss_bytes() -> int:
    return status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This program's peak RSS: VmHWM, which starts afresh at exec. (``ru_maxrss`` does not: it
    keeps the forked parent's resident pages, a whole pytest process when a test starts this.)"""
    return status_bytes("VmHWM")


def main() -> None:
    import jax
    import numpy as np

    jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory counts as the base
    base = rss_bytes()
    from pagedjax import LLM, SamplingParams

    llm = LLM()
    engine = llm.engine
    built = rss_bytes()
    n = engine.max_model_len - 1
    t0 = time.perf_counter()
    out = llm.generate([[int(t) for t in np.random.default_rng(0).integers(100, 20000, n)]],
                       SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    seconds = time.perf_counter() - t0
    r = engine.runner

    def step_temp(max_blocks: int) -> int:  # a full token budget over max_blocks of context
        layout = r.layout_for(engine.config.max_num_batched_tokens, 1, max_blocks)
        packed = r._to_device(np.zeros(layout.size, np.int32))
        return r._step.lower(r.params, r.pool, r._sampled, packed, layout=layout).compile() \
            .memory_analysis().temp_size_in_bytes
    print(json.dumps({
        "prompt_tokens": n, "output_tokens": len(out.outputs[0].token_ids),
        "finish_reason": out.outputs[0].finish_reason, "error": out.error,
        "seconds": seconds, "base_rss": base, "built_rss": built,
        "peak_rss": peak_rss_bytes(),
        "largest_step_temp": step_temp(r.max_blocks), "short_context_step_temp": step_temp(1),
        "report": engine.memory["bytes"]}), flush=True)


if __name__ == "__main__":
    main()

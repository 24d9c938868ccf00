"""The pagedjax side of ``native-vs-paged`` and the JAX contiguous-cache baseline, in their own
process: the parent sets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` to the simulated card's share of the
GPU before JAX starts, so the engine sizes its pool (bytes_limit x gpu_memory_utilization -
weights - activations) inside the same budget transformers gets.

    python -m benchmarks.native_jax SPEC.json RESULT.json

One engine at ``max_model_len`` = the reservation length (the model's 32768, the post-mortem's
"to be safe" setting) runs the three cases, each twice: a warm-up pass (the identical workload;
for the single sequence of case (a), its first 16 new tokens), then the measured pass. Then the
engine is dropped and the contiguous baseline is measured: how many per-sequence caches of
``[L, 2, max_model_len, K, H]`` fit, (1) by arithmetic in the very KV budget the paged pool got,
and (2) by allocating them one by one until the device refuses (with no headroom kept: an upper
bound that flatters the baseline). RESULT.json is rewritten after every step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks import harness


def _status(e: BaseException) -> str:
    text = str(e)
    return "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "error"


def _case(llm, prompts, params, res: dict, name: str, save, warmup_tokens: int | None = None):
    """Warm up (the identical workload, or its first ``warmup_tokens`` new tokens), then measure.
    A single request also gets its time to first token (a run of ``max_tokens=1``) and its decode
    rate after it."""
    row = {"requests": len(prompts), "prompt_len": max(len(p) for p in prompts),
           "new_tokens_requested": params.max_tokens}
    try:
        warm_params = (dataclasses.replace(params, max_tokens=min(warmup_tokens, params.max_tokens))
                       if warmup_tokens else params)
        warm = harness.generate(llm, prompts, warm_params)
        row["warmup_s"], row["warmup_compilations"] = warm.elapsed_s, warm.compilations
        if len(prompts) == 1:
            row["ttft_s"] = harness.generate(
                llm, prompts, dataclasses.replace(params, max_tokens=1)).elapsed_s
        r = harness.generate(llm, prompts, params)
        done = all(o.outputs[0].finish_reason == "length"
                   and len(o.outputs[0].token_ids) == params.max_tokens for o in r.outputs)
        row.update(r.figures(), status="completed" if done else "incomplete",
                   timeline=harness.thin(r.timeline))
        if "ttft_s" in row and r.elapsed_s > row["ttft_s"]:
            row["decode_tok_s"] = (params.max_tokens - 1) / (r.elapsed_s - row["ttft_s"])
    except Exception as e:  # noqa: BLE001 - an OOM is a result; the next case still runs
        row.update(status=_status(e), error=f"{type(e).__name__}: {str(e)[:300]}")
    mem = harness.device_memory()
    if mem:
        row["peak_bytes_in_use"] = mem["peak_bytes_in_use"]  # since the process started
    res["cases"][name] = row
    rate = f", {row['output_tok_s']:.1f} tok/s" if "output_tok_s" in row else ""
    print(f"[pagedjax] case {name}: {len(prompts)} x {row['prompt_len']} + {params.max_tokens}: "
          f"{row['status']}{rate}", flush=True)
    save()


def _contiguous(cfg, dtype: str, reserve_len: int, budget_bytes: int, cap: int) -> dict:
    """Per-sequence contiguous caches of reserve_len tokens: how many fit the paged pool's budget
    (arithmetic), and how many the device actually allocates (measured, GPU only)."""
    import jax
    import jax.numpy as jnp

    from pagedjax.worker.kv_pool import KVPoolSpec

    shape = (cfg.num_hidden_layers, 2, reserve_len, cfg.num_key_value_heads, cfg.head_dim)
    per_seq = KVPoolSpec.for_model(cfg, 0, 1, dtype).bytes_per_token * reserve_len
    out = {"reserve_len": reserve_len, "bytes_per_seq": per_seq, "shape_per_seq": shape,
           "seqs_in_same_budget": budget_bytes // per_seq, "seqs_allocatable": None}
    if jax.devices()[0].platform == "cpu":
        return out  # no device allocator to refuse: the arithmetic is the answer
    held = []
    try:
        while len(held) < cap:
            held.append(jax.block_until_ready(jnp.zeros(shape, dtype)))
    except Exception as e:  # noqa: BLE001 - the refusal is the measurement
        out["refusal"] = f"{_status(e)}: {str(e)[:200]}"
    out["seqs_allocatable"] = len(held)
    out["allocation_capped"] = len(held) >= cap
    del held
    return out


def main(spec_path: str, result_path: str) -> None:
    import jax

    from pagedjax import SamplingParams
    from pagedjax.config import EngineArgs

    spec = json.loads(Path(spec_path).read_text())
    out = Path(result_path)
    res: dict = {"cases": {}}

    def save():
        out.write_text(json.dumps(res, default=float))

    t0 = time.perf_counter()
    loaded = harness.load(argparse.Namespace(**spec["load"]))
    cfg = loaded.cfg
    mem = harness.device_memory()
    res.update(load_s=time.perf_counter() - t0, dtype=loaded.dtype, memory_after_load=mem,
               weights_bytes=sum(x.nbytes for x in jax.tree.leaves(loaded.params)))
    ea = EngineArgs(**spec["engine"])
    reserve_len = ea.max_model_len or cfg.max_position_embeddings
    llm = harness.make_llm(loaded, EngineArgs(**{**spec["engine"], "max_model_len": reserve_len}))
    e = llm.engine
    pool = e.spec
    res["pool"] = {"num_blocks": pool.num_blocks, "block_size": pool.block_size,
                   "tokens": pool.num_tokens, "bytes": pool.total_bytes,
                   "max_model_len": reserve_len, "max_num_seqs": ea.max_num_seqs,
                   "max_num_batched_tokens": e.config.max_num_batched_tokens}
    res.update(harness.precompile_figures(e))
    save()

    vocab, seed, cases = cfg.vocab_size, spec["load"]["seed"], spec["cases"]
    greedy = dict(temperature=0.0, ignore_eos=True)
    if "a" in cases:
        a = cases["a"]
        # One sequence: its decode steps share one shape while its block-table width bucket (a
        # power of two of blocks) does not change, which holds for 10,001..12,000 tokens; a short
        # warm-up then compiles everything, and the measured run's count says if it did not.
        _case(llm, harness.random_prompts([a["prompt_len"]], vocab, seed),
              SamplingParams(max_tokens=a["new_tokens"], **greedy), res, "a", save,
              warmup_tokens=16)
    n_b = 0
    if "b" in cases:
        b = cases["b"]
        n_b = pool.max_concurrency(b["context"])
        res["paged_seqs_8k_arithmetic"] = n_b
        if n_b >= 1:
            _case(llm, harness.random_prompts([b["context"] - b["new_tokens"]] * n_b, vocab, seed),
                  SamplingParams(max_tokens=b["new_tokens"], **greedy), res, "b", save)
    if "c" in cases:
        c = cases["c"]
        _case(llm, harness.random_prompts([c["prompt_len"]] * c["batch"], vocab, seed),
              SamplingParams(max_tokens=c["new_tokens"], **greedy), res, "c", save)

    harness.release(llm)
    del llm, e
    if "b" not in cases:
        return
    contiguous = _contiguous(cfg, loaded.dtype, reserve_len, pool.total_bytes,
                             cap=4 * max(n_b, 1) + 8)
    res["contiguous"] = contiguous
    save()
    print(f"[pagedjax] contiguous {reserve_len}-token caches: {contiguous['seqs_in_same_budget']} "
          f"in the same KV budget, {contiguous['seqs_allocatable']} allocatable; paged 8K "
          f"requests: {n_b}", flush=True)

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.native_jax SPEC.json RESULT.json")
    main(sys.argv[1], sys.argv[2])

"""latency: end-to-end and per-token latency of one batch, over batch sizes x prompt lengths.

For every (batch size, prompt length) pair, a batch of random prompts generates ``--output-len``
tokens each (``ignore_eos``), ``--num-iters-warmup`` times unmeasured (compiling its step
shapes) and ``--num-iters`` times measured, as `vllm bench latency` does. Reported per pair:
end-to-end batch latency percentiles (p10/p50/p90/p99), time to first token (TTFT) and time per
output token after the first (TPOT) over every request of every measured iteration, the
inter-step latency (ITL: wall time between consecutive engine steps), and the step shapes
compiled during measured iterations (``compilations_after_warmup``, the target is 0).

Then ``backend_parity`` (issue 4's check on the device itself): the engine's greedy tokens with
the Pallas kernels must equal those with the pure-jnp reference attention.
"""
from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, plots
from benchmarks.common import int_list, print_table, results_dir, write_result

logger = logging.getLogger(__name__)

PERCENTILES = (10, 50, 90, 99)
COLUMNS = ["batch", "input_len", "output_len", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
           "ttft_p50_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms",
           "output_tok_s", "compilations"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma list")
    p.add_argument("--input-lens", type=int_list, default=[32, 1024], help="comma list")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--parity-model", default="Qwen2.5-0.5B-Instruct",
                   help="shipped config (dummy float32 weights) of the backend parity check, "
                        "or none to skip it")


def backend_parity(args) -> dict:
    """Greedy tokens of two engines on one model, one with the reference attention and one with
    the Pallas kernels of this device (the GPU ones, interpreted, on the CPU).

    float32 weights, activations and KV, and matmuls at "highest" precision, so that what is
    compared is the attention kernels, not TF32 or bfloat16 rounding (with bf16 and dummy weights
    the logits are near ties, and any change of summation order flips some argmaxes). Prompts of
    1 to 700 tokens go through chunked prefill (256 tokens a step, so a prompt spans several
    steps over its own paged context) and then decode. Not covered: the Mosaic GPU prefill kernel,
    which takes bf16 / f16 only."""
    from pagedjax import SamplingParams
    from pagedjax.worker.attention import resolve_backend
    from pagedjax.config import EngineArgs
    from pagedjax.models.loader import load_model

    if args.tiny:
        loaded = harness.load(argparse.Namespace(**{**vars(args), "dtype": "float32"}))
        lens, new = [1, 17, 40], 4
    else:
        loaded = load_model(args.parity_model, load_format="dummy", dtype="float32", seed=0)
        lens, new = [1, 17, 100, 300, 700], 32
    prompts = harness.random_prompts(lens, loaded.cfg.vocab_size, 7)
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=new)
    pallas = resolve_backend("auto")
    pallas = "pallas-gpu" if pallas == "reference" else pallas  # CPU: GPU kernels, interpreted
    tokens, backends = {}, {}
    with jax.default_matmul_precision("highest"):
        for name, backend in (("reference", "reference"), ("pallas", pallas)):
            ea = EngineArgs(max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=8,
                            attention_backend=backend, precompile=False, seed=0)
            llm = harness.make_llm(loaded, ea)
            backends[name] = backend
            outs = harness.generate(llm, prompts, sp).outputs
            tokens[name] = [o.outputs[0].token_ids for o in outs]
            harness.release(llm)
    ref, got = tokens["reference"], tokens["pallas"]
    first_diff = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None)
                  for r, g in zip(ref, got)]
    out = {"model": args.parity_model if not args.tiny else "tiny", "dtype": "float32",
           "matmul_precision": "highest", "backends": backends, "prompt_lens": lens,
           "new_tokens": new, "identical": ref == got, "first_divergence": first_diff,
           "reference_tokens": ref, "pallas_tokens": got}
    logger.info("backend parity (%s vs %s): identical %s", backends["reference"],
                backends["pallas"], out["identical"])
    return out


def _measure(llm, batch: int, input_len: int, args) -> dict:
    from pagedjax import SamplingParams

    sp = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    vocab = llm.engine.cfg.vocab_size
    for i in range(args.num_iters_warmup):
        harness.generate(llm, harness.random_prompts([input_len] * batch, vocab, 1000 + i), sp)
    e2e, ttft, tpot, itl, compiled, tokens = [], [], [], [], 0, 0
    for i in range(args.num_iters):
        r = harness.generate(llm, harness.random_prompts([input_len] * batch, vocab, i), sp)
        e2e.append(r.elapsed_s)
        compiled += r.compilations
        tokens += r.output_tokens
        t = np.array([0.0] + [s["t"] for s in r.timeline])
        itl.extend(np.diff(t)[1:].tolist())  # the first step is a prefill, not a token gap
        for o in r.outputs:
            m, n = o.metrics, len(o.outputs[0].token_ids)
            ttft.append(m.first_token_time - m.arrival_time)
            if n > 1:
                tpot.append((m.last_token_time - m.first_token_time) / (n - 1))

    def pct(xs, q, scale=1.0):
        return float(np.percentile(xs, q) * scale) if xs else None

    row = {"batch": batch, "input_len": input_len, "output_len": args.output_len,
           **{f"e2e_p{q}_s": pct(e2e, q) for q in PERCENTILES},
           "e2e_mean_s": float(np.mean(e2e)),
           **{f"ttft_p{q}_ms": pct(ttft, q, 1e3) for q in PERCENTILES},
           **{f"tpot_p{q}_ms": pct(tpot, q, 1e3) for q in PERCENTILES},
           **{f"itl_p{q}_ms": pct(itl, q, 1e3) for q in PERCENTILES},
           "output_tok_s": tokens / sum(e2e), "compilations": compiled}
    logger.info("batch %d x %d: e2e p50 %.3f s, TPOT p50 %.2f ms", batch, input_len,
                row["e2e_p50_s"], row["tpot_p50_ms"] or float("nan"))
    return row


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured here."""
    n = nbytes // 4 if jax.devices()[0].platform != "cpu" else (1 << 22)
    x = jnp.arange(n, dtype=jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return 2 * n * 4 * reps / (time.perf_counter() - t0)


def run(args) -> dict:
    loaded = harness.load(args)
    longest = max(args.input_lens) + args.output_len
    llm = harness.make_llm(loaded, harness.engine_args(
        args, max_model_len=args.max_model_len or max(longest, 16)))
    rows = [_measure(llm, b, n, args) for b in args.batch_sizes for n in args.input_lens]
    print_table(rows, COLUMNS)
    print(f"Avg latency: {np.mean([r['e2e_mean_s'] for r in rows]):.4f} seconds over "
          f"{len(rows)} batch x length pairs")
    summary = {"compilations_after_warmup": sum(r["compilations"] for r in rows),
               **harness.precompile_figures(llm.engine)}
    b1 = [r for r in rows if r["batch"] == 1 and r["tpot_p50_ms"]]
    if b1:  # issue 4's figures: batch-1 decode speed and model-bandwidth utilisation
        r = b1[0]
        copy_bw = copy_bandwidth()
        # the engine's weights: --quantization fp8 quantises a copy of the loaded ones
        weights = sum(x.size * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(llm.engine.runner.params))
        kv = llm.engine.spec.bytes_per_token * (
            r["input_len"] + args.output_len / 2)  # mean context read per decode step
        step_s = r["tpot_p50_ms"] / 1e3
        summary.update(batch1_tok_s=1.0 / step_s,
                       batch1_mbu_pct=100.0 * (weights + kv) / step_s / copy_bw,
                       copy_GBps=copy_bw / 1e9, weight_GB=weights / 1e9)
        if args.quantization == "fp8":  # issue 23's key
            summary["fp8w_batch1_tok_s"] = summary["batch1_tok_s"]
    for r in rows:
        key = f"b{r['batch']}_in{r['input_len']}"
        summary[f"{key}_e2e_p50_s"] = r["e2e_p50_s"]
        summary[f"{key}_tpot_p50_ms"] = r["tpot_p50_ms"]
    figures = {"model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
               "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
               "rows": rows, "table": {"columns": COLUMNS, "rows": rows}}
    plots.save(results_dir(args.out) / "latency.png", [
        {"kind": "bars", "title": "end-to-end batch latency, p50 (s)", "ylabel": "s",
         "labels": [f"{r['batch']}x{r['input_len']}" for r in rows],
         "values": [r["e2e_p50_s"] for r in rows], "rotation": 30},
        {"kind": "bars", "title": "time per output token, p50 (ms)", "ylabel": "ms",
         "labels": [f"{r['batch']}x{r['input_len']}" for r in rows],
         "values": [r["tpot_p50_ms"] for r in rows], "rotation": 30},
    ], title=f"latency, {args.output_len} new tokens (batch x prompt length)")
    harness.release(llm)
    write_result("latency", summary, figures, out=args.out)  # kept if the parity check fails
    if args.parity_model != "none":
        figures["backend_parity"] = parity = backend_parity(args)
        summary["greedy_identical_reference_vs_pallas"] = parity["identical"]
        write_result("latency", summary, figures, out=args.out)
    return summary

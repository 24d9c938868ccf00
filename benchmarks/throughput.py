"""throughput: offline LLM.generate requests/s, total and output tok/s, as `vllm bench throughput`.

Two workloads, both with ``ignore_eos`` so every request generates exactly its output length:

* fixed lengths (default): ``--num-prompts`` prompts of ``--input-len`` random token ids, each
  generating ``--output-len`` tokens;
* ``--dataset sharegpt-like``: a seeded synthetic length distribution resembling ShareGPT as vLLM's
  benchmarks use it. No conversation data is downloaded; only the lengths matter to the speed.
  Prompt lengths are log-normal with median 120 tokens and sigma 1.2, output lengths log-normal
  with median 130 and sigma 1.0, then filtered the way vLLM filters ShareGPT: every length >= 4,
  prompt <= 1024, prompt + output <= 2048 (and <= ``--max-model-len``). That gives means of about
  210 prompt and 200 output tokens per request, medians 120 / 130, and a long tail to 1024, close
  to the ~210 / ~200 tokens per request that vLLM's ShareGPT throughput runs report. The same
  ``--seed`` gives the same lengths.

Sampling as vLLM's benchmark: temperature 1.0, top_p 1.0, ``ignore_eos``. On a GPU or TPU the
engine compiles every step shape when it starts (``--precompile``, on there by default:
``precompile_s``, ``precompile_compilations``); then a short warm-up ``generate``
(``--num-warmup-prompts`` requests drawn the same way, default one full batch of
``--max-num-seqs``) runs unmeasured (``warmup_s``; ``warmup_compilations`` is what it still
compiled: 0 when the engine precompiled). The measured run records how many new shapes it still
compiled (``compilations_after_warmup``, the target is 0: by construction with
``--precompile``). ``--full-warmup`` compiles every bucket instead of the warm-up pass (what
``--precompile`` does at start).
"""
from __future__ import annotations

import argparse
import logging
import time

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result

logger = logging.getLogger(__name__)

TARGET_OUTPUT_TOK_S = 12_000  # issue 8, Qwen2.5-7B 1000/1000 x 1000 on the H100


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--dataset", choices=("random", "sharegpt-like"), default="random",
                   help="random: fixed --input-len/--output-len; sharegpt-like: see the module doc")
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--num-warmup-prompts", type=int, default=None,
                   help="requests in the warm-up (default: min(num-prompts, max-num-seqs))")
    p.add_argument("--full-warmup", action="store_true",
                   help="compile every bucket up to the longest request instead of a warm-up pass")


def _workload(args, n: int, seed: int, max_model_len: int, vocab: int):
    if args.dataset == "sharegpt-like":
        plens, olens = harness.sharegpt_like_lengths(n, seed, max_model_len)
    else:
        if args.input_len + args.output_len > max_model_len:
            raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} is "
                             f"more than --max-model-len {max_model_len}: raise it or shorten them")
        plens, olens = [args.input_len] * n, [args.output_len] * n
    from pagedjax import SamplingParams

    prompts = harness.random_prompts(plens, vocab, seed)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=int(o),
                             seed=seed + i) for i, o in enumerate(olens)]
    return prompts, params


def run(args) -> dict:
    loaded = harness.load(args)
    llm = harness.make_llm(loaded, harness.engine_args(args))
    e = llm.engine
    vocab = e.cfg.vocab_size
    prompts, params = _workload(args, args.num_prompts, args.seed, e.max_model_len, vocab)

    t0 = time.perf_counter()
    if args.full_warmup:
        longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
        e.runner.warmup(max_context=longest)
        warm_compiled = len(e.runner.buckets(max_context=longest))
        warm = None
    else:
        n_warm = args.num_warmup_prompts or min(args.num_prompts, args.max_num_seqs)
        wp, wsp = _workload(args, n_warm, args.seed + 1, e.max_model_len, vocab)
        warm = harness.generate(llm, wp, wsp)
        warm_compiled = warm.compilations
    warmup_s = time.perf_counter() - t0
    logger.info("warm-up: %d step shapes compiled in %.1f s", warm_compiled, warmup_s)
    tag = "" if args.dataset == "random" else args.dataset
    # a placeholder until the measured run ends: a run killed by a time limit says how far it got
    write_result("throughput", {"output_tok_s": None, "compilations_after_warmup": None,
                                "warmup_s": warmup_s, "warmup_compilations": warm_compiled,
                                **harness.precompile_figures(e),
                                "status": "warm-up done, measured run not finished"},
                 {}, out=args.out, tag=tag)

    r = harness.generate(llm, prompts, params)
    print(f"Throughput: {r.requests_s:.2f} requests/s, {r.total_tok_s:.2f} total tokens/s, "
          f"{r.output_tok_s:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {r.prompt_tokens}")
    print(f"Total num output tokens:  {r.output_tokens}")
    print(f"Compilations after warm-up: {r.compilations} (warm-up compiled {warm_compiled} "
          f"shapes in {warmup_s:.1f} s)")

    summary = {
        "output_tok_s": r.output_tok_s, "total_tok_s": r.total_tok_s,
        "requests_per_s": r.requests_s, "compilations_after_warmup": r.compilations,
        "elapsed_s": r.elapsed_s, "num_prompts": args.num_prompts, "dataset": args.dataset,
        "mean_input_len": r.prompt_tokens / len(prompts),
        "mean_output_len": r.output_tokens / len(prompts),
        "host_fraction": r.host_s / r.elapsed_s, "preemptions": r.preemptions,
        "kv_cache_tokens": e.spec.num_tokens, "warmup_s": warmup_s,
        # under tp every GPU holds every block (its share of the heads): tokens per GPU = tokens
        "tp": args.tensor_parallel_size, "pool_tokens_per_gpu": e.spec.num_tokens,
        "warmup_compilations": warm_compiled, **harness.precompile_figures(e),
        "kv_pool_gib": e.spec.total_bytes / 2**30,
    }
    if args.quantization == "fp8":  # issue 23's keys: FP8 weights' speed and the KV room they free
        summary.update(fp8w_output_tok_s=r.output_tok_s, fp8w_pool_gib=summary["kv_pool_gib"])
    print_table([{k: summary[k] for k in ("dataset", "num_prompts", "mean_input_len",
                                          "mean_output_len", "requests_per_s", "total_tok_s",
                                          "output_tok_s", "compilations_after_warmup")}])
    figures = {
        "model": loaded.cfg.name or args.model, "dtype": loaded.dtype,
        "engine": {"max_model_len": e.max_model_len, "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": e.config.max_num_batched_tokens,
                   "block_size": args.block_size, "kv_cache_blocks": e.spec.num_blocks,
                   "gpu_memory_utilization": args.gpu_memory_utilization},
        "input_len": args.input_len if args.dataset == "random" else None,
        "output_len": args.output_len if args.dataset == "random" else None,
        "measured": {k: v for k, v in r.figures().items()},
        "warmup": warm.figures() if warm else {"full_warmup_shapes": warm_compiled},
        "timeline": harness.thin(r.timeline),
        "target_output_tok_s": TARGET_OUTPUT_TOK_S,
        "table": {"columns": ["dataset", "num_prompts", "mean_input_len", "mean_output_len",
                              "requests_per_s", "total_tok_s", "output_tok_s",
                              "compilations_after_warmup"],
                  "rows": [summary]},
    }
    _plot(results_dir(args.out) / f"throughput{'-' + tag if tag else ''}.png", r, args)
    write_result("throughput", summary, figures, out=args.out, tag=tag)
    harness.release(llm)
    return summary


def _plot(path, r: harness.Run, args) -> None:
    xs, rate = harness.rate_series(r.timeline)
    tl = r.timeline
    plots.save(path, [
        {"kind": "lines", "title": "output tokens/s over the run", "xlabel": "s",
         "ylabel": "tok/s", "series": {"output tok/s": (xs, rate)},
         "hlines": {f"mean {r.output_tok_s:,.0f}": r.output_tok_s}},
        {"kind": "lines", "title": "KV pool use and running sequences", "xlabel": "s",
         "ylabel": "fraction of max", "series": {
             "KV pool used": ([s["t"] for s in tl], [s["kv_usage"] for s in tl]),
             f"running / {args.max_num_seqs}": ([s["t"] for s in tl],
                                               [s["running"] / args.max_num_seqs for s in tl])}},
    ], title=f"throughput ({args.dataset}, {args.num_prompts} prompts)")

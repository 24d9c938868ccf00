"""beam: beam search and n=4 sampling memory and speed, with and without KV block sharing.

The classic experiment: beam_width 4 and n=4 sampling over 1,000-token prompts with 500 new
tokens. Figures: peak KV blocks per request with sharing (fork + copy-on-write) and with it
switched off (``disable_kv_sharing``: every fork copies its parent's blocks), the blocks the
prompt part occupies across the 4 beams over one sequence's, the maximum concurrent requests
the pool holds at each, and output tok/s of beam search, n=4 sampling and greedy. Output tokens
count every beam's / sample's generated token, so the three rates compare the same work.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import harness
from benchmarks.common import print_table, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="Qwen2.5-7B-Instruct")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=500)
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (tests)")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile every step shape and copy program at engine start (default: "
                        "on with the Pallas kernels on a GPU or TPU)")


def _llm(args, share: bool):
    from pagedjax import LLM

    kw = dict(max_model_len=args.max_model_len, disable_kv_sharing=not share,
              num_gpu_blocks_override=args.num_gpu_blocks_override,
              max_num_seqs=max(64, args.num_requests * args.width),
              precompile=getattr(args, "precompile", None))
    if args.tiny:
        from tests.conftest import TINY_QWEN, TinyModel, random_params

        return LLM(loaded=TinyModel(TINY_QWEN, random_params(TINY_QWEN)), **kw)
    return LLM(args.model, load_format=args.load_format, dtype=args.dtype, **kw)


def _run(llm, kind: str, prompts, args):
    """Run one kind over all prompts; returns (seconds, generated tokens, peak blocks)."""
    from pagedjax import BeamSearchParams, SamplingParams

    eng, peak, prompt_union = llm.engine, 0, []
    for i, p in enumerate(prompts):
        if kind == "beam":
            eng.add_beam_request(f"{kind}{i}", p, BeamSearchParams(
                beam_width=args.width, max_tokens=args.output_len, ignore_eos=True))
        else:
            n = args.width if kind == "n4" else 1
            eng.add_request(f"{kind}{i}", p, SamplingParams(
                n=n, temperature=0.8 if n > 1 else 0.0, seed=i, max_tokens=args.output_len,
                ignore_eos=True), stream=False)
    gen0, t0 = eng.stats.generation_tokens, time.perf_counter()
    pblocks = -(-args.prompt_len // eng.spec.block_size)
    while eng.has_unfinished():
        eng.step()
        bm = eng.block_manager
        peak = max(peak, bm.num_blocks - bm.num_free)
        if kind == "beam" and eng.requests:
            req = next(iter(eng.requests.values()))
            tables = [bm.table(s.seq_id)[:pblocks] for s in req.seqs if bm.table(s.seq_id)]
            if len(tables) == args.width:
                prompt_union.append(len(set().union(*tables)) / pblocks)
    dt = time.perf_counter() - t0
    return dt, eng.stats.generation_tokens - gen0, peak, (max(prompt_union) if prompt_union else None)


def run(args) -> dict:
    rng = np.random.default_rng(0)
    rows, figures = [], {}
    for share in (True, False):
        llm = _llm(args, share)
        vocab = llm.engine.cfg.vocab_size
        prompts = [rng.integers(10, vocab - 1, size=args.prompt_len).tolist()
                   for _ in range(args.num_requests)]
        figures[f"precompile_share_{share}"] = harness.precompile_figures(llm.engine)
        for kind in ("greedy", "n4", "beam"):
            # warm-up: the same requests (every step shape and copy program is compiled at
            # engine start where --precompile is on; elsewhere this pass compiles them); then
            # peak blocks of ONE request (its own shapes, compiled there), then the timed batch
            _run(llm, kind, prompts, args)
            _, _, one_peak, prompt_ratio = _run(llm, kind, prompts[:1], args)
            c0 = llm.engine.runner.num_compilations
            dt, gen, _, _ = _run(llm, kind, prompts, args)
            rows.append({"sharing": share, "kind": kind, "peak_blocks_per_request": one_peak,
                         "max_concurrent_requests": llm.engine.spec.num_blocks // max(one_peak, 1),
                         "output_tok_s": gen / dt, "prompt_part_ratio": prompt_ratio})
            figures[f"compilations_after_warmup_{kind}_share_{share}"] = (
                llm.engine.runner.num_compilations - c0)
        del llm
    print_table(rows)
    by = {(r["sharing"], r["kind"]): r for r in rows}
    summary = {
        "beam_vs_n4_throughput_ratio": by[True, "beam"]["output_tok_s"] / by[True, "n4"]["output_tok_s"],
        "beam_prompt_memory_ratio": by[True, "beam"]["prompt_part_ratio"],
        "beam_blocks_sharing_vs_not": by[True, "beam"]["peak_blocks_per_request"]
        / by[False, "beam"]["peak_blocks_per_request"],
        "n4_blocks_sharing_vs_not": by[True, "n4"]["peak_blocks_per_request"]
        / by[False, "n4"]["peak_blocks_per_request"],
        "compilations_after_warmup": max(v for k, v in figures.items()
                                         if k.startswith("compilations")),
    }
    write_result("beam", summary, {"rows": rows, **figures, "args": vars(args)}, out=args.out)
    return summary

"""beam: beam search and n=4 sampling memory and speed, with and without KV block sharing.

The classic experiment: beam_width 4 and n=4 sampling over 1,000-token prompts with 500 new
tokens. Figures: peak KV blocks per request with sharing (fork + copy-on-write) and with it
switched off (``CopyingBlockManager``: every fork copies its parent's blocks), the blocks the
prompt part occupies across the 4 beams over one sequence's, the maximum concurrent requests
the pool holds at each, and output tok/s of beam search, n=4 sampling and greedy. Output tokens
count every beam's / sample's generated token, so the three rates compare the same work.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import harness
from pagedjax.core.block_manager import BlockManager
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


class CopyingBlockManager(BlockManager):
    """A block manager without sharing, as an engine without copy-on-write: a fork copies every
    block of its parent at once; the copies ride the next step (``pending_copies``)."""

    def fork(self, parent_id: int, child_id: int) -> None:
        table = self.table(parent_id)
        if len(table) > self.num_free:
            raise RuntimeError(f"fork without sharing: {len(table)} blocks, {self.num_free} free")
        self.tables[child_id] = [self._take() for _ in table]
        self.pending_copies += zip(table, self.tables[child_id])


def _engine(args, share: bool):
    from pagedjax.engine import LLMEngine

    if args.tiny:
        from tests.conftest import TINY_QWEN, TinyModel, random_params
    loaded = TinyModel(TINY_QWEN, random_params(TINY_QWEN)) if args.tiny else None
    ea = harness.engine_args(args, max_num_seqs=max(64, args.num_requests * args.width))
    return LLMEngine(ea, loaded=loaded, block_manager_cls=None if share else CopyingBlockManager)


def _run(eng, kind: str, prompts, args):
    """Run one kind over all prompts; returns (seconds, generated tokens, peak blocks)."""
    from pagedjax import BeamSearchParams, SamplingParams

    peak, prompt_union = 0, []
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
    pblocks = eng.spec.blocks_for(args.prompt_len)
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
        eng = _engine(args, share)
        vocab = eng.cfg.vocab_size
        prompts = [rng.integers(10, vocab - 1, size=args.prompt_len).tolist()
                   for _ in range(args.num_requests)]
        figures[f"precompile_share_{share}"] = harness.precompile_figures(eng)
        for kind in ("greedy", "n4", "beam"):
            # warm-up: the same requests (every step shape and copy program is compiled at
            # engine start where --precompile is on; elsewhere this pass compiles them); then
            # peak blocks of ONE request (its own shapes, compiled there), then the timed batch
            _run(eng, kind, prompts, args)
            _, _, one_peak, prompt_ratio = _run(eng, kind, prompts[:1], args)
            c0 = eng.runner.num_compilations
            dt, gen, _, _ = _run(eng, kind, prompts, args)
            rows.append({"sharing": share, "kind": kind, "peak_blocks_per_request": one_peak,
                         "max_concurrent_requests": eng.spec.num_blocks // max(one_peak, 1),
                         "output_tok_s": gen / dt, "prompt_part_ratio": prompt_ratio})
            figures[f"compilations_after_warmup_{kind}_share_{share}"] = (
                eng.runner.num_compilations - c0)
        del eng
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

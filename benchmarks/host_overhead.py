"""host-overhead: host time per engine step (schedule + prepare + update) with a fake device.

The device step is a numpy stub given to the engine through its fake-device seam
(``LLMEngine(execute=...)``) that returns tokens at once, so what is measured is exactly the
Python the engine runs between two device steps, at 8 / 64 / 256 decoding sequences; the phases
come from the engine's own counters (``EngineStats``).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchmarks.common import print_table, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="8,64,256")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)


def _fake_engine(num_seqs: int, prompt_len: int, steps: int, **engine_kw):
    from pagedjax import SamplingParams
    from pagedjax.config import EngineArgs
    from pagedjax.engine import LLMEngine
    from pagedjax.models import ModelConfig
    from pagedjax.worker.runner import StepResult
    from pagedjax.worker.sampler import MAX_LOGPROBS

    cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=16, max_position_embeddings=prompt_len + steps + 64)

    @dataclasses.dataclass
    class Loaded:
        cfg: ModelConfig
        params: dict = None
        tokenizer: object = None
        dtype: str = "float32"

    blocks = num_seqs * (-(-(prompt_len + steps + 32) // 16))
    rng = np.random.default_rng(0)

    def fake_execute(inputs):  # what the device would return, instantly
        layout = inputs.layout
        top = np.tile(np.arange(3, 3 + MAX_LOGPROBS, dtype=np.int32), (layout.S, 1))
        return StepResult(rng.integers(3, cfg.vocab_size, size=layout.S).astype(np.int32),
                          np.full(layout.S, -1.0, np.float32),
                          np.full((layout.S, MAX_LOGPROBS), -2.0, np.float32), top)

    args = EngineArgs.from_kwargs(num_gpu_blocks_override=blocks, max_num_seqs=num_seqs,
                                  max_num_batched_tokens=max(2048, num_seqs),
                                  max_model_len=cfg.max_position_embeddings, **engine_kw)
    engine = LLMEngine(args, loaded=Loaded(cfg), execute=fake_execute)
    sp = SamplingParams(max_tokens=steps + 10, ignore_eos=True, temperature=0.7)
    for i in range(num_seqs):
        engine.add_request(str(i), rng.integers(3, 32000, size=prompt_len).tolist(), sp,
                           stream=False)  # as LLM.generate does
    return engine


def run(args) -> dict:
    rows = []
    for b in map(int, args.batch_sizes.split(",")):
        engine = _fake_engine(b, args.prompt_len, args.steps)
        while any(s.num_computed_tokens < len(s.prompt_token_ids) for r in engine.requests.values()
                  for s in r.seqs):
            engine.step()  # prefill everyone first
        before = engine.make_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        total = (time.perf_counter() - t0) / args.steps * 1e3
        d = engine.make_stats().delta(before)
        per = {k: d[f"{k}_seconds"] / args.steps * 1e3 for k in ("schedule", "prepare", "update")}
        per["other"] = total - sum(per.values())  # dispatch bookkeeping, step loop
        rows.append({"running_seqs": b, **{f"{k}_ms": v for k, v in per.items()},
                     "total_ms": sum(per.values())})
    print_table(rows)
    summary = {f"host_ms_per_step_b{r['running_seqs']}": r["total_ms"] for r in rows}
    summary["compilations_after_warmup"] = 0  # no device step runs in this scenario
    write_result("host-overhead", summary, {"rows": rows}, out=args.out)
    return summary

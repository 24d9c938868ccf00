"""Shared by the scale-out tests and the two-process worker: one workload, run at a given tp."""
from __future__ import annotations

import functools

import numpy as np

from tests.conftest import TINY_LLAMA, TINY_QWEN, TinyModel, random_params

# Prompt lengths: 1 token, a page boundary + 1, and a multi-chunk prefill (> 32 tokens a step).
PROMPT_LENS = (1, 17, 45)
MAX_TOKENS = 6
ENGINE = dict(num_gpu_blocks_override=24, block_size=16, max_model_len=96,
              max_num_batched_tokens=32, max_num_seqs=4)


@functools.cache
def tiny(name: str) -> TinyModel:
    cfg, seed = {"tiny_qwen": (TINY_QWEN, 0), "tiny_llama": (TINY_LLAMA, 1)}[name]
    return TinyModel(cfg, random_params(cfg, seed=seed))


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(2, vocab, size=n).tolist() for n in PROMPT_LENS]


def generate_tp(model: TinyModel, tp: int, **engine):
    """(llm, outputs): greedy token ids with the top-5 logprobs of every generated token."""
    from pagedjax import LLM, SamplingParams

    llm = LLM(loaded=model, tensor_parallel_size=tp, **{**ENGINE, **engine})
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts(model.cfg.vocab_size), sp, use_tqdm=False)
    return llm, [{"token_ids": o.outputs[0].token_ids, "logprobs": o.outputs[0].logprobs}
                 for o in outs]

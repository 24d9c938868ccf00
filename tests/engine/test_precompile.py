"""Engine-level precompilation (``--precompile``): every step shape, sampler variant and copy
program compiles when the engine is built, and nothing compiles after that, whatever runs.

On the CPU the Pallas GPU kernels run in interpret mode: the runner then uses the same coarse
buckets as on a GPU, so forcing ``precompile=True`` here checks what a real accelerator does
(its default there). A one-layer model keeps each compile to about a second."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pagedjax import LLM, BeamSearchParams, SamplingParams
from pagedjax.worker.kv_pool import KVPoolSpec
from pagedjax.worker.runner import SAMPLE_MODES, ModelRunner
from tests.conftest import TINY_QWEN, TinyModel, assert_no_leak, random_params

TINY1 = dataclasses.replace(TINY_QWEN, num_hidden_layers=1)
PALLAS = dict(attention_backend="pallas-gpu", precompile=True)


@pytest.fixture(scope="module")
def tiny1():
    return TinyModel(TINY1, random_params(TINY1, seed=3))


def _runner(backend: str, max_num_seqs: int, budget: int, max_model_len: int = 256):
    spec = KVPoolSpec(1, 8, 16, 2, 16, "float32")
    return ModelRunner(TINY1, None, spec, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, attention_backend=backend)


@pytest.mark.parametrize("max_num_seqs,budget", [(20, 64), (3, 16), (6, 100), (12, 8),
                                                 (352, 520), (256, 300)])
def test_buckets_hold_every_shape_a_step_can_have(max_num_seqs, budget):
    """Exhaustive: every (tokens, sampling rows) a scheduled step can have (a decode step: as
    many tokens as sequences; a mixed step: 2..budget tokens; either: up to max_num_seqs rows,
    n > 1 forks included) lands in ``buckets()``, max_num_seqs a power of two or not."""
    r = _runner("pallas-gpu", max_num_seqs, budget)
    buckets = set(r.buckets())
    for n in range(1, min(budget, max_num_seqs) + 1):
        for rows in range(n, max_num_seqs + 1):
            assert r.layout_for(n, rows, 1, decode=True) in buckets, ("decode", n, rows)
    for n in range(2, budget + 1):
        for rows in range(1, max_num_seqs + 1):
            layout = r.layout_for(n, rows, 1 + n % 16)
            assert layout in buckets, ("mixed", n, rows)
            assert rows <= layout.S <= max(max_num_seqs, 4) and layout.T >= n


def test_bucket_counts_and_the_reference_backend():
    r = _runner("pallas-gpu", 256, 4096)
    mixed = [b for b in r.buckets() if not b.decode]
    assert [(b.T, b.S) for b in mixed] == [(16, 16), (32, 32), (64, 64), (128, 128),
                                           (256, 256), (512, 256), (1024, 256), (2048, 256),
                                           (4096, 256)]
    assert len(r.buckets()) == 16 and r.copy_buckets() == [4, 8, 16, 32, 64, 128, 256]
    # 352 sequences: mixed steps from T = 512 up get S = 352 (not 512, not a missing bucket)
    assert {b.S for b in _runner("pallas-gpu", 352, 4096).buckets() if b.T >= 512} == {352}
    ref = _runner("reference", 6, 32, max_model_len=160)  # W is bucketed too: 4, 8, 10 blocks
    buckets = set(ref.buckets())
    for n in range(2, 33):
        for rows in range(1, 7):
            for blocks in range(1, 11):
                assert ref.layout_for(n, rows, blocks) in buckets


def test_precompile_is_on_only_where_it_pays(tiny1):
    kw = dict(num_gpu_blocks_override=16, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=16)
    for backend in ("pallas-gpu", "reference"):  # interpreted kernels / fine buckets: off
        e = LLM(loaded=tiny1, attention_backend=backend, **kw).engine
        assert not e.precompile and e.runner.num_compilations == 0
    e = LLM(loaded=tiny1, **PALLAS, **kw).engine
    sizes = {b.S for b in e.runner.buckets()}
    assert e.precompile and e.precompile_s > 0
    assert e.precompile_compilations == e.runner.num_compilations == (
        len(e.runner.buckets()) + len(sizes) * len(SAMPLE_MODES) + len(e.runner.copy_buckets()))


def _wave(rng, k: int, vocab: int):
    prompts = [rng.integers(2, vocab, size=int(n)).tolist() for n in rng.integers(1, 200, size=k)]
    params = [SamplingParams(max_tokens=int(m), temperature=float(t), top_k=int(top_k),
                             logprobs=lp, n=int(n), seed=i, ignore_eos=True)
              for i, (m, t, top_k, lp, n) in enumerate(zip(
                  rng.integers(1, 50, size=k), rng.choice([0.0, 1.0], size=k),
                  rng.choice([0, 5], size=k), rng.choice([None, 2], size=k),
                  rng.choice([1, 1, 1, 3], size=k)))]
    return prompts, params


def test_precompiled_engine_compiles_nothing_in_a_throughput_like_run(tiny1):
    """Waves of requests of varied lengths and sampling (greedy / random, top-k, logprobs, n = 3
    with copy-on-write), chunked prefill, preemption and beam search: 20 sequences (not a power
    of two) and 64-token steps; nothing compiles after the engine is built."""
    llm = LLM(loaded=tiny1, num_gpu_blocks_override=96, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=20, **PALLAS)
    e, rng = llm.engine, np.random.default_rng(7)
    compiled = e.runner.num_compilations
    assert compiled == e.precompile_compilations > 0
    copies = []
    prepare = e.runner.prepare
    e.runner.prepare = lambda batch: (copies.append(len(batch.copies)), prepare(batch))[1]
    for _ in range(3):
        outs = llm.generate(*_wave(rng, 24, TINY1.vocab_size), use_tqdm=False)
        assert all(c.finish_reason == "length" for o in outs for c in o.outputs)
        assert e.runner.num_compilations == compiled, "a step compiled after --precompile"
    llm.beam_search([rng.integers(2, 128, size=40).tolist()],
                    BeamSearchParams(beam_width=3, max_tokens=12))
    assert e.runner.num_compilations == compiled, "beam search compiled after --precompile"
    assert e.scheduler.num_preemptions > 0 and sum(copies) > 0
    assert_no_leak(llm)


def test_precompiled_engine_compiles_nothing_while_swapping(tiny1):
    """Preemption by swap: the pool comes back from the swap programs and the step, sampler and
    copy programs compiled at start still serve it."""
    llm = LLM(loaded=tiny1, num_gpu_blocks_override=16, preemption_mode="swap",
              num_cpu_blocks_override=64, block_size=16, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=6, **PALLAS)
    e, rng = llm.engine, np.random.default_rng(1)
    compiled, host_compiled = e.runner.num_compilations, e.host_pool.num_compilations
    prompts = [rng.integers(2, 128, size=int(k)).tolist() for k in rng.integers(40, 81, size=8)]
    params = [SamplingParams(max_tokens=40, temperature=t, logprobs=lp, seed=i, ignore_eos=True)
              for i, (t, lp) in enumerate([(0.0, None), (1.0, None), (0.0, 1), (1.0, 2)] * 2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert e.scheduler.num_preemptions_swap >= 3 and e.host_pool.stats.blocks["in"] > 0
    assert e.runner.num_compilations == compiled, "a step compiled after a swap"
    assert e.host_pool.num_compilations == host_compiled
    assert_no_leak(llm)


def test_what_prompt_logprobs_and_penalties_cost_in_compilations(tiny1):
    """A prompt-logprobs step compiles its own model step shape (T, Q) and sampler variant; a
    penalised step its sampler variant per (S, history bucket). Requests that ask for neither
    still compile nothing, before or after them."""
    llm = LLM(loaded=tiny1, num_gpu_blocks_override=96, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=4, **PALLAS)
    e, rng = llm.engine, np.random.default_rng(3)
    compiled = e.runner.num_compilations
    plain = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompt = rng.integers(2, 128, size=40).tolist()
    llm.generate([prompt], plain, use_tqdm=False)
    assert e.runner.num_compilations == compiled
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == 40
    assert e.runner.num_compilations == compiled + 2  # step (T 64, Q 64) + its sampler
    compiled = e.runner.num_compilations
    llm.generate([prompt], SamplingParams(max_tokens=8, repetition_penalty=1.2, min_tokens=2),
                 use_tqdm=False)
    assert e.runner.num_compilations > compiled  # lazily: a sampler per (S, history bucket)
    compiled = e.runner.num_compilations
    llm.generate(*_wave(rng, 6, TINY1.vocab_size), use_tqdm=False)
    assert e.runner.num_compilations == compiled
    assert_no_leak(llm)

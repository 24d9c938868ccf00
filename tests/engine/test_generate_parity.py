"""The paged engine generates exactly what full recompute generates, under preemption and chunking."""
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from tests.conftest import assert_no_leak, greedy_reference

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("model_name", ["tiny_qwen", "tiny_llama"])
def test_32_mixed_prompts_with_preemption_match_reference(model_name, request):
    model = request.getfixturevalue(model_name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.cfg.vocab_size, size=int(n)).tolist()
               for n in rng.integers(1, 301, size=32)]
    prompts[0], prompts[1] = [5], rng.integers(0, 128, size=300).tolist()  # both extremes
    new = 8
    # 40 blocks x 16 = 640 tokens: far less than 32 prompts need at once, so sequences preempt.
    llm = LLM(loaded=model, num_gpu_blocks_override=40, block_size=16, max_model_len=512,
              max_num_batched_tokens=128, max_num_seqs=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, **GREEDY), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_reference(model, p, new), f"prompt of {len(p)}"
        assert o.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


def test_chunked_prefill_equals_unchunked(tiny_qwen):
    prompt = np.random.default_rng(1).integers(0, 128, size=1000).tolist()
    sp = SamplingParams(max_tokens=6, **GREEDY)
    chunked = LLM(loaded=tiny_qwen, max_num_batched_tokens=128, max_model_len=1100,
                  num_gpu_blocks_override=80)
    whole = LLM(loaded=tiny_qwen, max_num_batched_tokens=1024, max_model_len=1100,
                num_gpu_blocks_override=80)
    a = chunked.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert chunked.engine.stats.steps >= 8 + 5, "1000 tokens at 128 per step take 8 prefill steps"
    b = whole.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b == greedy_reference(tiny_qwen, prompt, 6, pad_to=1024)
    assert_no_leak(chunked)
    assert_no_leak(whole)


def test_no_new_compilations_after_warmup(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=8)
    rng = np.random.default_rng(2)

    def workload(seed):
        r = np.random.default_rng(seed)
        return ([r.integers(0, 128, size=int(n)).tolist() for n in r.integers(1, 120, size=12)],
                [SamplingParams(max_tokens=int(m), temperature=float(t), seed=int(seed), top_k=5)
                 for m, t in zip(r.integers(10, 40, size=12), r.choice([0.0, 0.8], size=12))])

    llm.engine.runner.warmup(max_context=256)
    warm = llm.engine.runner.num_compilations
    prompts, params = workload(3)
    for rid, (p, sp) in enumerate(zip(prompts, params)):
        llm.engine.add_request(str(rid), p, sp)
    steps = 0
    while llm.engine.has_unfinished():
        if steps % 7 == 3 and steps < 60:  # keep the batch composition changing
            p, sp = workload(steps)[0][0], SamplingParams(max_tokens=5, temperature=0.0)
            llm.engine.add_request(f"late-{steps}", p, sp)
        llm.engine.step()
        steps += 1
    assert steps >= 50
    assert llm.engine.runner.num_compilations == warm, "a step shape escaped the warmed buckets"
    assert_no_leak(llm)

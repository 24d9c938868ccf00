"""Sampling on the device: seeded draws are reproducible and independent of batching."""
import numpy as np

from pagedjax import LLM, SamplingParams
from tests.conftest import assert_no_leak


def test_seeded_sampling_is_batch_independent(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=int(n)).tolist() for n in (5, 40, 17, 90)]
    sp = [SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=s, max_tokens=12,
                         ignore_eos=True) for s in range(4)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], s, use_tqdm=False)[0].outputs[0].token_ids
             for p, s in zip(prompts, sp)]
    assert together == alone
    other = llm.generate([prompts[0]], SamplingParams(temperature=0.9, seed=99, max_tokens=12,
                                                      ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != together[0]  # the seed matters
    assert_no_leak(llm)


def test_top_k_1_is_greedy_and_logprobs_reported(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256)
    p = [7, 8, 9, 10]
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                              logprobs=0), use_tqdm=False)[0].outputs[0]
    topk1 = llm.generate([p], SamplingParams(temperature=1.3, top_k=1, seed=3, max_tokens=8,
                                             ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert greedy.token_ids == topk1.token_ids
    # logprobs=0: vLLM's shape, one {token: logprob} per position holding the sampled token
    assert [list(d) for d in greedy.logprobs] == [[t] for t in greedy.token_ids]
    chosen = [d[t] for d, t in zip(greedy.logprobs, greedy.token_ids)]
    assert all(lp <= 0 for lp in chosen)
    assert np.isclose(greedy.cumulative_logprob, sum(chosen), atol=1e-4)
    top5 = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                            logprobs=5), use_tqdm=False)[0].outputs[0]
    for d, t in zip(top5.logprobs, top5.token_ids):
        assert len(d) == 5 and max(d, key=d.get) == t  # greedy: the sampled token is the best


def test_stop_token_ids_and_eos(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256)
    p = [7, 8, 9, 10]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop_at = free[3]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                           stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:free.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at

"""The vLLM request surface against transformers (fp32 tiny Qwen2 and Llama, the embedded
SmolLM2): prompt logprobs equal the log-softmax of transformers' logits, and greedy generation with
repetition_penalty / min_tokens equals ``generate`` with repetition_penalty / min_new_tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedjax import LLM, SamplingParams
from pagedjax.models import load_model
from tests.conftest import assert_no_leak
from tests.models.loader_testutil import torch_logits


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()


def _check_prompt_logprobs(out, prompt: list[int], ref: np.ndarray, k: int, atol: float):
    """ref: transformers' logprobs [len(prompt), V] (row i predicts token i + 1)."""
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        entry = plp[i]
        assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]]) <= atol, (i, entry)
        top = np.argsort(-ref[i - 1])[:k]
        assert set(top) <= set(entry) and len(entry) <= k + 1
        for t in entry:
            assert abs(entry[t] - ref[i - 1, t]) <= atol


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_prompt_logprobs_match_transformers(hf_models, name):
    """Chunked prefill (16-token steps), prefix caching on with a prompt seen before (the cache
    must not skip positions whose logprobs are wanted), rows that do not ask in the same steps."""
    folder, model = hf_models[name]
    loaded = load_model(str(folder), dtype="float32")
    llm = LLM(loaded=loaded, num_gpu_blocks_override=64, max_model_len=128, block_size=16,
              max_num_batched_tokens=16, enable_prefix_caching=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, loaded.cfg.vocab_size, size=n).tolist() for n in (45, 7, 33)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # fills the cache
    params = [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3),
              SamplingParams(max_tokens=4, temperature=0),
              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, logprobs=2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[1].prompt_logprobs is None
    for out, prompt, p in zip(outs, prompts, params):
        if p.prompt_logprobs is not None:
            ref = _log_softmax(torch_logits(model, np.asarray([prompt]))[0])
            _check_prompt_logprobs(out, prompt, ref, p.prompt_logprobs, 1e-4)
    assert_no_leak(llm)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_repetition_penalty_and_min_tokens_match_transformers_generate(hf_models, name):
    folder, model = hf_models[name]
    loaded = load_model(str(folder), dtype="float32")
    llm = LLM(loaded=loaded, num_gpu_blocks_override=64, max_model_len=128,
              max_num_batched_tokens=32)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, loaded.cfg.vocab_size, size=n).tolist() for n in (12, 30, 5)]
    free = llm.generate(prompts[2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop = free[1]  # greedy would stop at the second token: min_tokens must hold it off
    cases = [(dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
             ({}, {}),
             (dict(min_tokens=6, stop_token_ids=[stop], repetition_penalty=0.8),
              dict(min_new_tokens=6, eos_token_id=stop, repetition_penalty=0.8))]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 **ours) for ours, _ in cases], use_tqdm=False)
    for out, prompt, (_, theirs) in zip(outs, prompts, cases):
        kw = dict(eos_token_id=None, **theirs) if "eos_token_id" not in theirs else theirs
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                             pad_token_id=0, **kw)[0, len(prompt):].tolist()
        if "eos_token_id" in theirs and stop in ref:
            ref = ref[:ref.index(stop) + 1]
        assert out.outputs[0].token_ids == ref, theirs
    assert len(outs[2].outputs[0].token_ids) >= 6
    assert_no_leak(llm)


def test_smollm2_prompt_logprobs_match_transformers(smollm2, smollm2_transformers, paragraph):
    llm = LLM(loaded=smollm2, num_gpu_blocks_override=32, max_model_len=512,
              max_num_batched_tokens=64)
    prompt = smollm2.tokenizer.encode(paragraph)[:100]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ref = _log_softmax(torch_logits(smollm2_transformers, np.asarray([prompt]))[0])
    _check_prompt_logprobs(out, prompt, ref, 1, 1e-3)
    assert_no_leak(llm)

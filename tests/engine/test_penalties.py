"""Repetition / presence / frequency penalties and min_tokens on the device: greedy outputs equal a
numpy reference that applies vLLM's formulas to full-recompute logits, for rows with and without
penalties in one batch, with async scheduling on and off; seeded sampling stays batch-invariant."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from tests.conftest import _dense, assert_no_leak


def reference(model, prompt: list[int], p: SamplingParams, eos: set[int]) -> list[int]:
    """Greedy decoding, whole sequence recomputed each token, penalties applied in numpy."""
    f, toks, out = _dense(model.cfg), list(prompt), []
    banned = sorted(eos | set(p.stop_token_ids))
    for _ in range(p.max_tokens):
        padded = jnp.zeros((1, 256), jnp.int32).at[0, :len(toks)].set(jnp.array(toks))
        x = np.asarray(f(model.params, padded)[0, len(toks) - 1], np.float32)
        counts = np.bincount(np.asarray(out, np.int64), minlength=x.size)
        seen = counts > 0
        seen[prompt] = True
        r = np.float32(p.repetition_penalty)
        x = np.where(seen, np.where(x > 0, x / r, x * r), x)
        x = (x - np.float32(p.frequency_penalty) * counts
             - np.float32(p.presence_penalty) * (counts > 0))
        if len(out) < p.min_tokens:
            x[banned] = -np.inf
        token = int(np.argmax(x))
        out.append(token)
        toks.append(token)
        if token in p.stop_token_ids or (token in eos and not p.ignore_eos):
            break
    return out


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(2, 128, size=int(n)).tolist() for n in (6, 23, 40, 9, 17)]


@pytest.mark.parametrize("model_name, async_scheduling", [("tiny_qwen", True),
                                                           ("tiny_llama", True),
                                                           ("tiny_qwen", False)])
def test_penalties_and_min_tokens_match_a_numpy_reference(request, prompts, model_name,
                                                          async_scheduling):
    model = request.getfixturevalue(model_name)
    g = dict(temperature=0, max_tokens=24)
    free = [reference(model, pr, SamplingParams(**g), set()) for pr in prompts]
    # EOS / a stop token: ones the unpenalised greedy run emits early, for min_tokens to hold off
    eos = free[3][1]
    model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, eos_token_ids=(eos,)))
    llm = LLM(loaded=model, num_gpu_blocks_override=64, max_model_len=256,
              max_num_batched_tokens=32, async_scheduling=async_scheduling)
    params = [SamplingParams(**g),  # no penalty: must be untouched by its batch mates
              SamplingParams(repetition_penalty=1.8, **g),
              SamplingParams(presence_penalty=2.0, frequency_penalty=1.0, **g),
              SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.5, min_tokens=6, **g),
              SamplingParams(min_tokens=5, stop_token_ids=[free[4][1]], **g)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    want = [reference(model, pr, p, {eos}) for pr, p in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outs] == want
    plain = [reference(model, pr, SamplingParams(**g), {eos}) for pr in prompts]
    assert all(w != p for w, p in zip(want[1:], plain[1:])), "a penalty changed nothing"
    assert all(len(w) >= 5 for w in want[3:])
    assert_no_leak(llm)


def test_min_tokens_holds_off_eos_then_lets_it_end(tiny_qwen, prompts):
    llm0 = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256)
    free = llm0.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    stop = ids[0]  # the very first greedy token would end the output at once
    out = llm0.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=30, min_tokens=4,
                                                     stop_token_ids=[stop]),
                        use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 5 and stop not in out.token_ids[:4]
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop
    assert_no_leak(llm0)


def test_penalised_sampling_is_batch_invariant(tiny_qwen, prompts):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, max_model_len=256)
    sp = [SamplingParams(temperature=0.9, seed=s, max_tokens=10, ignore_eos=True, top_k=30,
                         repetition_penalty=1.3, presence_penalty=0.4 * s, min_tokens=3)
          for s in range(4)] + [SamplingParams(temperature=0.9, seed=9, max_tokens=10)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], s, use_tqdm=False)[0].outputs[0].token_ids
             for p, s in zip(prompts, sp)]
    assert together == alone
    assert_no_leak(llm)

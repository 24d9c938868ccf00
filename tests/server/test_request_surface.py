"""vLLM's request surface through the openai client: echo + logprobs with max_tokens 0 (what
lm-evaluation-harness sends to score a prompt), the prompt_logprobs extra, and the penalties and
min_tokens mapped through on both endpoints."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import SamplingParams
from pagedjax.models import forward_dense
from tests.server.conftest import MODEL


def test_echo_logprobs_with_max_tokens_0_scores_the_prompt(server, tok_model):
    prompt = "The cat sat on the mat."
    ids = tok_model.tokenizer.encode(prompt)
    logits = forward_dense(tok_model.params, tok_model.cfg, jnp.asarray([ids]))[0]
    ref = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    r = server.client().completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1,
                                           max_tokens=0, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = np.array(lp.token_logprobs[1:])
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert lp.text_offset == list(range(len(prompt)))  # one character per token here
    for i in range(1, len(ids)):  # the prompt token and the top 1
        best = tok_model.tokenizer.decode([int(np.argmax(ref[i - 1]))])
        assert best in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 2


def test_echo_logprobs_with_generation_and_the_prompt_logprobs_extra(server, ref_llm):
    prompt = "Once upon a time"
    ref = ref_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                    logprobs=2, prompt_logprobs=2),
                           use_tqdm=False)[0]
    r = server.client().completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "prompt_logprobs": 2})
    c = r.choices[0]
    assert c.text == prompt + ref.outputs[0].text
    n = len(ref.prompt_token_ids)
    assert len(c.logprobs.tokens) == n + 5 and c.logprobs.token_logprobs[0] is None
    want = [d[t] for d, t in zip(ref.prompt_logprobs[1:], ref.prompt_token_ids[1:])]
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:n], want, atol=1e-6)
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == n
    for entry, d in zip(plp[1:], ref.prompt_logprobs[1:]):
        assert {int(t): v["logprob"] for t, v in entry.items()} == pytest.approx(d, abs=1e-6)
        ranks = sorted(v["rank"] for v in entry.values() if v["rank"] is not None)
        assert ranks == [1, 2]


def test_penalties_and_min_tokens_are_honoured_on_both_endpoints(server, ref_llm):
    extra = {"repetition_penalty": 1.6, "min_tokens": 4}
    params = dict(temperature=0, max_tokens=12, presence_penalty=0.5, frequency_penalty=0.3)
    want = ref_llm.generate(["abcabc"], SamplingParams(**params, **extra),
                            use_tqdm=False)[0].outputs[0]
    plain = ref_llm.generate(["abcabc"], SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0]
    assert want.token_ids != plain.token_ids  # the penalties change this output
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="abcabc", extra_body=extra, **params)
    assert r.choices[0].text == want.text
    ids = ref_llm.tokenizer.apply_chat_template([{"role": "user", "content": "abc"}],
                                                add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = ref_llm.generate([ids], SamplingParams(**params, **extra), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "abc"}],
                                       extra_body=extra, **params)
    assert r.choices[0].message.content == want.outputs[0].text

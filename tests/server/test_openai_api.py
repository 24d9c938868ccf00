"""The official openai client against the real server: what it gets equals LLM.generate."""
import asyncio

import pytest

from pagedjax import BeamSearchParams, SamplingParams
from pagedjax.entrypoints.generate import build_prompt
from tests.server.conftest import MODEL

IGNORE_EOS = {"ignore_eos": True}


def ref_texts(ref_llm, prompt, **params) -> list[str]:
    out = ref_llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]
    return [o.text for o in out.outputs]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9,
                                                                   seed=1234)],
                         ids=["greedy", "seeded"])
def test_completion_and_its_stream_equal_generate(server, ref_llm, slow_engine, sampling):
    client = server.client()
    prompt = "The quick brown fox"
    want = ref_texts(ref_llm, prompt, max_tokens=20, ignore_eos=True, **sampling)[0]
    assert len(want) >= 10, "the tiny model should produce visible text"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, extra_body=IGNORE_EOS,
                                  **sampling)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stream=True,
                                            extra_body=IGNORE_EOS, **sampling))
    assert len(chunks) > 5, "at 20 ms a step, a stream comes in pieces"
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n2_with_seed_equals_generate_streamed_or_not(server, ref_llm):
    client = server.client()
    sampling = dict(temperature=1.0, seed=7, n=2, max_tokens=12)
    want = ref_texts(ref_llm, "Once upon", ignore_eos=True, **sampling)
    assert len(want) == 2 and want[0] != want[1]
    r = client.completions.create(model=MODEL, prompt="Once upon", extra_body=IGNORE_EOS,
                                  **sampling)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    got = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt="Once upon", stream=True,
                                           extra_body=IGNORE_EOS, **sampling):
        for c in chunk.choices:
            got[c.index] += c.text
    assert got == want


def test_chat_completion_and_stream_use_the_chat_template(server, ref_llm):
    client = server.client()
    ids = build_prompt(ref_llm.tokenizer, "Say hi", raw=False, system=None)
    assert ids[0] == ref_llm.tokenizer.convert_tokens_to_ids("<|user|>")
    want = ref_texts(ref_llm, ids, temperature=0.0, max_tokens=16, ignore_eos=True)[0]
    messages = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=16, extra_body=IGNORE_EOS)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=16, stream=True, extra_body=IGNORE_EOS,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_token_id_prompts_lists_echo_stop_and_logprobs(server, ref_llm):
    client = server.client()
    a, b = [20, 21, 22, 23], [40, 41]
    want = [ref_texts(ref_llm, p, temperature=0.0, max_tokens=8, ignore_eos=True)[0]
            for p in (a, b)]
    r = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=8, temperature=0,
                                  logprobs=3, extra_body=IGNORE_EOS)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    lp = r.choices[0].logprobs
    ref = ref_llm.generate([a], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                               logprobs=3), use_tqdm=False)[0].outputs[0]
    decode = ref_llm.tokenizer.decode
    assert lp.tokens == [decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([top[t] for t, top in zip(ref.token_ids,
                                                                        ref.logprobs)], abs=1e-5)
    for got, top in zip(lp.top_logprobs, ref.logprobs):  # greedy: the sampled token is the top 1
        assert len(got) == 3
        assert got == pytest.approx({decode([i]): v for i, v in top.items()}, abs=1e-5)
        assert max(got.values()) == pytest.approx(lp.token_logprobs[lp.top_logprobs.index(got)])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body=IGNORE_EOS)
    content = chat.choices[0].logprobs.content
    ref = ref_llm.generate([build_prompt(ref_llm.tokenizer, "x", raw=False, system=None)],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert [c.token for c in content] == [decode([t]) for t in ref.token_ids]
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    echoed = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0,
                                       echo=True, extra_body=IGNORE_EOS)
    assert echoed.choices[0].text.startswith("abc")
    # a stop string cut from the middle of the greedy text, streamed or not
    full = ref_texts(ref_llm, "abc", temperature=0.0, max_tokens=20, ignore_eos=True)[0]
    stop = full[6:8]
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0,
                                  stop=[stop], extra_body=IGNORE_EOS)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0,
                                         stop=[stop], stream=True, extra_body=IGNORE_EOS)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_beam_search_equals_llm_beam_search(server, ref_llm):
    prompt = [30, 31, 32, 33, 34]
    want = ref_llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=10,
                                                          ignore_eos=True))[0].sequences
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, n=2, best_of=3,
                                  temperature=0, extra_body={"use_beam_search": True, **IGNORE_EOS})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [s.text for s in want[:2]]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "beam"}], max_tokens=6, n=2, stream=True,
        extra_body={"use_beam_search": True, **IGNORE_EOS})
    texts = ["", ""]
    for chunk in chat:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    ids = build_prompt(ref_llm.tokenizer, "beam", raw=False, system=None)
    best = ref_llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=6,
                                                       ignore_eos=True))[0].sequences
    assert texts == [s.text for s in best]


def test_16_concurrent_requests_equal_one_at_a_time(server):
    prompts = [f"request {i}: " + "xyz"[: i % 3 + 1] * (i % 5 + 1) for i in range(16)]
    kw = dict(model=MODEL, max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    client = server.client()
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    async def together():
        aclient = server.async_client()

        async def one(i, p):
            if i % 2:  # half of them stream
                text = ""
                async for chunk in await aclient.completions.create(prompt=p, stream=True, **kw):
                    text += chunk.choices[0].text
                return text
            return (await aclient.completions.create(prompt=p, **kw)).choices[0].text

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 8, "different prompts should give different texts"


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 64

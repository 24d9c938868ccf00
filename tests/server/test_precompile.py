"""``pagedjax serve --precompile``: the server compiles every engine program before it answers, its
``pagedjax:step_compilations`` counter shows them from the start, and a mix of real HTTP requests
(the openai client: completions and chat, streamed or not, greedy / top-p / top-k, logprobs,
n = 2, concurrent) compiles nothing more. The Pallas GPU kernels run interpreted on the CPU, with
the coarse buckets a GPU gets; a one-layer model keeps the start to seconds."""
from __future__ import annotations

import argparse
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedjax.entrypoints.server import add_arguments, build_server
from tests.conftest import TINY_QWEN, TinyModel, random_params
from tests.server.conftest import MODEL, Server, char_tokenizer, server_argv, start_uvicorn

COMPILED = "pagedjax:step_compilations_total"


@pytest.fixture(scope="module")
def precompiled_server():
    cfg = dataclasses.replace(TINY_QWEN, num_hidden_layers=1)
    model = TinyModel(cfg, random_params(cfg, seed=4), tokenizer=char_tokenizer(cfg.vocab_size))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = server_argv(attention_backend="pallas-gpu") + ["--precompile"]
    uv, aengine = build_server(parser.parse_args(argv), loaded=model)
    running = start_uvicorn(uv)
    yield Server(running.url, aengine, uv.config.app)
    running.stop()
    aengine.shutdown()


def test_requests_over_http_compile_nothing_after_precompile(precompiled_server):
    server, engine = precompiled_server, precompiled_server.aengine.engine
    assert engine.precompile and engine.precompile_compilations > 0
    at_start = server.wait_metric(COMPILED, lambda v: v > 0)
    assert at_start == engine.precompile_compilations == engine.runner.num_compilations
    client = server.client()

    def completion(i: int):
        kw = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=i),
              dict(temperature=1.0, logprobs=2, seed=i), dict(temperature=0.7, n=2, seed=i),
              dict(temperature=0.8, extra_body={"top_k": 5, "ignore_eos": True}, seed=i)][i % 5]
        prompt = "abcdefghij klmnopqrstuvwxyz 0123456789"[:3 + 7 * i % 36]
        if i % 3 == 0:
            chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                    max_tokens=4 + i % 9, **kw))
            return "".join(c.choices[0].text for c in chunks)
        if i % 3 == 1:
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}],
                max_tokens=4 + i % 9, **{k: v for k, v in kw.items() if k != "logprobs"})
            return r.choices[0].message.content
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=4 + i % 9,
                                         **kw).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(completion, range(18)))
    assert len(texts) == 18 and all(isinstance(t, str) for t in texts)
    assert server.metrics()[(COMPILED, "")] == at_start, "a request compiled a program"
    assert engine.runner.num_compilations == engine.precompile_compilations


def test_startup_phases_are_served(precompiled_server):
    """/metrics carries the engine's start-up phases (what benchmarks/startup.py splits a start
    into); with a loaded model there is no load phase, and precompile is the one that compiled."""
    import httpx

    engine = precompiled_server.aengine.engine
    text = httpx.get(f"{precompiled_server.url}/metrics", timeout=30).text
    served = {line.split('phase="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines()
              if line.startswith("pagedjax:startup_phase_seconds{")}
    assert served == pytest.approx(engine.startup_s)
    assert list(served) == ["prepare weights", "size pool", "host memory", "allocate pool",
                            "precompile"]
    assert served["precompile"] >= engine.precompile_s > 0
    parts = {line.split('programs="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines()
             if line.startswith("pagedjax:precompile_seconds{")}
    assert parts == pytest.approx(engine.precompile_parts)
    assert set(parts) == {"steps", "sampler", "copies"} and all(v > 0 for v in parts.values())
    assert max(parts.values()) <= served["precompile"]  # the kinds overlap (runner.warmup)

"""Fault injection: a device step that fails after the KV pool was donated fails only its own
requests (500 through the server), the engine rebuilds the pool and what it generates next is
still right; an out-of-memory at start says which flags to change."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import pytest

from pagedjax import SamplingParams
from pagedjax.worker import faults, kv_pool
from pagedjax.entrypoints.cli import main as cli_main
from pagedjax.config import EngineArgs
from pagedjax.engine import LLMEngine
from tests.conftest import greedy_reference
from tests.reliability.conftest import FIGURES, on_engine_thread
from tests.reliability.fake_device import fake_engine
from tests.server.conftest import API_KEY, MODEL

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def lose_the_pool_then_raise(runner):
    """Make the next ``runner._step`` run (its pool argument is donated, so the runner's pool
    is deleted) and then raise, as a device failure after dispatch does."""
    real = runner._step

    def step(*args, **kwargs):
        runner._step = real
        real(*args, **kwargs)
        assert runner.pool[0][0].is_deleted(), "the pool was donated to the step"
        raise RuntimeError("injected device fault")

    runner._step = step


def fail_inside_the_step(runner):
    """Make the next ``runner._step`` fail on the device, as a real device error does: the step
    runs (its pool donated), then its logits and pool pass through a program that fails while
    it executes (a host callback raising inside it), after a slow program it waits for, so that
    it fails asynchronously as a large step does: dispatch succeeds, every array the step wrote
    is poisoned (the sampler's outputs too, among them the sampled-token buffer the next step
    reads), and the error surfaces where the host reads the results (``to_host``)."""
    real = runner._step

    def boom(x):
        raise RuntimeError("injected device fault")

    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ a / 256), x))
    poison = jax.jit(lambda gate, logits, pool: (
        logits + jax.pure_callback(boom, gate, gate)[0, 0], pool), donate_argnums=2)
    x = jnp.ones((256, 256))
    slow(x).block_until_ready()

    def step(*args, **kwargs):
        runner._step = real
        logits, pool = real(*args, **kwargs)
        compiled = poison.lower(x, logits, pool).compile()  # compiling would outlast the gate
        logits, pool = compiled(slow(x), logits, pool)
        assert not logits.is_ready(), "the injected fault must fail after dispatch"
        return logits, pool

    runner._step = step


@pytest.mark.parametrize("inject", [lose_the_pool_then_raise, fail_inside_the_step])
def test_a_failed_step_fails_only_its_requests_and_the_engine_recovers(tiny_qwen, inject):
    engine = LLMEngine(EngineArgs(max_model_len=64, block_size=16, max_num_seqs=2,
                                  max_num_batched_tokens=16, num_gpu_blocks_override=16,
                                  enable_prefix_caching=True), loaded=tiny_qwen)
    shared = list(range(3, 43))  # 40 tokens: two full blocks go to the prefix cache

    def run(prompts: dict[str, list[int]]) -> dict:
        for rid, p in prompts.items():
            engine.add_request(rid, p, GREEDY, stream=False)
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        return done

    before = run({"warm": shared})["warm"].outputs[0].token_ids
    assert engine.block_manager.cached, "the shared prompt's blocks are cached"
    compiled = engine.runner.num_compilations
    for rid, p in {"a": [5] * 20, "b": [6] * 30, "same": shared, "c": [7, 8, 9] * 5}.items():
        engine.add_request(rid, p, GREEDY, stream=False)
    engine.step()
    engine.step()  # "a" and "b" run (--max-num-seqs 2); "same" and "c" wait
    inject(engine.runner)
    outs = engine.step()
    while not outs:  # the error surfaces when the host reads the step's results
        outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    for o in outs:
        assert o.finished and "injected device fault" in o.error
        assert o.outputs[0].finish_reason == "error"
        assert -1 not in o.outputs[0].token_ids, "no PLACEHOLDER of the failed step is kept"
    assert engine.fault is None, "recovered"
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks and not bm.cached, "blocks freed, cache forgotten"
    assert sorted(engine.requests) == ["c", "same"]
    assert not engine.runner.pool[0][0].is_deleted(), "a fresh pool"
    done = run({})
    # With the cache kept, "same" would read the lost pool's blocks (zeros now).
    assert done["same"].outputs[0].token_ids == before
    assert done["c"].outputs[0].token_ids == greedy_reference(tiny_qwen, [7, 8, 9] * 5, 8)
    assert engine.runner.num_compilations == compiled, "the rebuilt pool reuses the step"
    assert bm.num_free == bm.num_blocks and not engine.requests


def test_a_pool_that_cannot_be_rebuilt_is_fatal(monkeypatch):
    engine, device = fake_engine()
    engine.add_request("r", [5] * 10, GREEDY)
    device.fail = True

    def no_memory(old):
        raise RuntimeError("RESOURCE_EXHAUSTED: device lost")

    monkeypatch.setattr(faults, "fresh_pool", no_memory)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 85899345920 bytes."


def test_out_of_memory_at_start_names_the_flags(tiny_qwen, tmp_path, monkeypatch, capsys):
    def allocate(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(kv_pool, "allocate", allocate)
    with pytest.raises(faults.DeviceOutOfMemoryError) as e:
        LLMEngine(EngineArgs(max_model_len=64, num_gpu_blocks_override=16), loaded=tiny_qwen)
    for fragment in ("--gpu-memory-utilization", "--max-model-len", "16 blocks", OOM):
        assert fragment in str(e.value)
    # the CLI prints it as a usage error, without a traceback
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128,
         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["serve", "--load-format", "dummy", "--model", str(tmp_path / "config.json"),
                  "--num-gpu-blocks-override", "16", "--port", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "out of device memory while allocating the KV pool" in err
    assert "--gpu-memory-utilization" in err and "Traceback" not in err


def test_a_failed_step_in_the_server_is_a_500_for_its_requests_only(rel_server, rel_ref,
                                                                     monkeypatch):
    """Six requests, four run at a time: the steps on the device when one fails (the failing one
    and, with async scheduling, the one before it) hold some of them; those get a 500 (an error
    event when streaming), the others complete with the sequential result."""
    engine = rel_server.aengine.engine
    runner = engine.runner
    step = engine.step

    def slow_step():  # >= 20 ms a step, so all six are in before any finishes
        time.sleep(0.02)
        return step()

    armed, victims, last = threading.Event(), [], []
    prepare, execute = runner.prepare, runner.execute

    def spy_prepare(batch):
        last[:] = [tuple(s.prompt_token_ids) for s in batch.seqs]
        return prepare(batch)

    def failing_execute(inputs):
        if armed.is_set() and len(last) >= 2 and engine.scheduler.waiting:
            armed.clear()
            victims.extend(last)  # and the step still on the device (async scheduling)
            victims.extend(tuple(s.prompt_token_ids) for f in engine._on_device
                           for s in f.batch.seqs)
            lose_the_pool_then_raise(runner)
        return execute(inputs)

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(runner, "prepare", spy_prepare)
    monkeypatch.setattr(runner, "execute", failing_execute)
    prompts = [f"fault {i}: " + "abc"[: i % 3 + 1] for i in range(6)]
    body = dict(model=MODEL, max_tokens=12, temperature=0, ignore_eos=True)
    errors_before = rel_server.metrics()[("pagedjax:request_success_total", "error")]
    armed.set()
    results = asyncio.run(_send_all(rel_server.url, prompts, body))
    encode = rel_server.aengine.engine.tokenizer.encode
    assert victims and len(victims) < len(prompts), victims
    failed = served = 0
    for i, (prompt, (status, text, error)) in enumerate(zip(prompts, results)):
        if tuple(encode(prompt)) in victims:
            assert status == (200 if i % 2 else 500), (status, error)  # odd ones stream
            assert error["code"] == "engine_step_failed", error
            assert "injected device fault" in error["message"]
            assert error["type"] == "server_error"
            failed += 1
        else:
            want = rel_ref.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                             ignore_eos=True), use_tqdm=False)
            assert (status, error) == (200, None)
            assert text == want[0].outputs[0].text, prompt
            served += 1
    with httpx.Client(base_url=rel_server.url) as http:
        assert http.get("/health").status_code == 200
    rel_server.wait_metric("pagedjax:kv_cache_usage_perc", lambda v: v == 0.0)
    rel_server.wait_metric("pagedjax:request_success_total", lambda v: v == errors_before + failed,
                           label="error")
    free = on_engine_thread(rel_server.aengine, lambda e: (e.block_manager.check_invariants(),
                                                           e.block_manager.num_free)[1])
    assert free == engine.block_manager.num_blocks
    FIGURES.append(f"fault injection (server): failed step held {failed} requests -> 500; "
                   f"{served} others served with the sequential output; /health 200")


async def _send_all(url: str, prompts: list[str], body: dict):
    """(status, text, OpenAI error or None) per prompt; odd ones stream."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        async def one(i: int, prompt: str):
            if i % 2 == 0:
                r = await client.post("/v1/completions", json={**body, "prompt": prompt})
                data = r.json()
                if r.status_code != 200:
                    return r.status_code, None, data["error"]
                return r.status_code, data["choices"][0]["text"], None
            text, error = "", None
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "prompt": prompt, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        error = event["error"]
                    else:
                        text += event["choices"][0]["text"]
                return r.status_code, text, error

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_generate_checks_every_request_before_adding_any_and_raises_a_step_error(tiny_qwen):
    from pagedjax import LLM
    from pagedjax.entrypoints.llm import EngineStepError
    from pagedjax.worker.sampler import MAX_LOGPROBS
    from tests.conftest import assert_no_leak

    llm = LLM(loaded=tiny_qwen, max_model_len=64, block_size=16, max_num_seqs=2,
              max_num_batched_tokens=16, num_gpu_blocks_override=6)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    for bad, match in ((SamplingParams(logprobs=MAX_LOGPROBS + 1), "logprobs"),
                       (SamplingParams(n=3), "max-num-seqs"),
                       (SamplingParams(max_tokens=60, n=2, temperature=1.0), "KV blocks")):
        with pytest.raises(ValueError, match=f"prompt 1: .*{match}"):
            llm.generate(prompts, [GREEDY, bad, GREEDY], use_tqdm=False)
        assert_no_leak(llm)  # the good prompts of the call were not queued
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    fail_inside_the_step(llm.engine.runner)
    with pytest.raises(EngineStepError, match="injected device fault") as e:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert e.value.prompts and set(e.value.prompts) <= {0, 1, 2}
    assert_no_leak(llm)  # the prompts the step did not hold were aborted, not left queued
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_health_is_503_while_the_engine_recovers(rel_server):
    """A failed step sets ``engine.fault`` until its reset succeeded (pagedjax.worker.faults)."""
    def set_fault(e, value):
        e.fault = value

    with httpx.Client(base_url=rel_server.url, timeout=10) as http:
        on_engine_thread(rel_server.aengine, lambda e: set_fault(e, "the device step failed: X"))
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_recovering"
        assert "the device step failed: X" in r.json()["error"]["message"]
        on_engine_thread(rel_server.aengine, lambda e: set_fault(e, None))
        assert http.get("/health").status_code == 200

"""Soak: many concurrent clients against the real server on 127.0.0.1 with random lengths,
streams, disconnects mid-stream, client timeouts and bad requests, under a KV pool too small for
all of them (preemption), a short waiting queue (503s) and a device fault injected inside every
FAULT_EVERY-th step (its requests fail with a 500 or an error event; the rest are recomputed).
Afterwards: no unexpected error, no leaked block, and every completed greedy request equals its
sequential LLM.generate result. Twice: as it is, and with prefix caching and its host tier
(--kv-offloading-size), the prompts then opening with one of a few shared prefixes.

Bounded: at most REQUESTS requests and DEADLINE seconds of load."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import string
import time

import httpx
import pytest

from pagedjax import SamplingParams
from tests.reliability.conftest import FIGURES, on_engine_thread
from tests.reliability.test_faults import fail_inside_the_step
from tests.server.conftest import API_KEY, MODEL

REQUESTS = 150
CLIENTS = 12
DEADLINE = 40.0  # seconds of load; requests not started by then are not sent
STEP_SECONDS = 0.005
RETRIES = 4
KV, RUNNING = "pagedjax:kv_cache_usage_perc", "pagedjax:num_requests_running"
FAULT_EVERY = 120  # engine steps between injected device faults
FAILED_STEP = "the device step failed"  # how a request of a failed step is answered
SHARED = ("You are a helpful bot. ", "Answer in one word: ", "Translate to French: ")  # 1 block+


@dataclasses.dataclass
class Outcome:
    kind: str  # "greedy" | "sampled" | "disconnect" | "timeout" | "bad"
    prompt: str
    max_tokens: int
    ignore_eos: bool
    status: int | None = None
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None  # an unexpected failure, said how
    retries: int = 0  # 503s before this outcome


def plan(rng: random.Random, i: int, shared: bool = False) -> tuple[str, dict]:
    prompt = "".join(rng.choice(string.ascii_letters + " .,") for _ in range(rng.randint(1, 40)))
    if shared:
        prompt = (rng.choice(SHARED) + prompt)[:40]
    max_tokens = rng.randint(1, min(24, 63 - len(prompt)))
    body = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=rng.random() < 0.7, stream=rng.random() < 0.5)
    r = rng.random()
    if r < 0.12:
        return "disconnect", {**body, "stream": True, "max_tokens": max(max_tokens, 12),
                              "ignore_eos": True}
    if r < 0.18:
        return "timeout", {**body, "stream": False, "max_tokens": max(max_tokens, 12),
                           "ignore_eos": True}
    if r < 0.26:  # each is refused with a 400 and changes nothing
        bad = rng.choice([{"prompt": "x" * 80}, {"prompt": [5, 999]}, {"max_tokens": 10**9},
                          {"n": 50}, {"temperature": -1}, {"prompt": []}])
        return "bad", {**body, **bad}
    if r < 0.36:
        return "sampled", {**body, "temperature": 0.9, "seed": i, "top_p": 0.95}
    return "greedy", body


async def one(client: httpx.AsyncClient, rng: random.Random, kind: str, body: dict) -> Outcome:
    out = Outcome(kind, body["prompt"], body["max_tokens"], body["ignore_eos"])
    try:
        if kind == "timeout":
            try:
                await client.post("/v1/completions", json=body, timeout=rng.uniform(0.02, 0.2))
                out.status = 200  # it finished first
            except httpx.TimeoutException:
                out.status = None  # the client gave up: the server aborts it
            return out
        if body["stream"]:
            text, finish = "", None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.text = json.loads(await r.aread())["error"]["message"]
                    return out
                cut = rng.randint(1, 3) if kind == "disconnect" else None
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        if FAILED_STEP in event["error"]["message"]:  # an injected fault
                            out.status, out.text = 500, event["error"]["message"]
                        else:
                            out.error = f"error event: {event['error']}"
                        return out
                    text += event["choices"][0]["text"]
                    finish = event["choices"][0]["finish_reason"] or finish
                    if cut is not None:
                        cut -= 1
                        if cut == 0:
                            out.status = None  # walk away mid-stream
                            return out
            out.text, out.finish_reason = text, finish
            return out
        r = await client.post("/v1/completions", json=body)
        out.status = r.status_code
        data = r.json()
        if r.status_code == 200:
            out.text = data["choices"][0]["text"]
            out.finish_reason = data["choices"][0]["finish_reason"]
        else:
            out.text = data["error"]["message"]
        return out
    except Exception as e:  # anything a client should never see
        out.error = f"{type(e).__name__}: {e}"
        return out


async def soak(url: str, shared: bool = False) -> tuple[list[Outcome], float]:
    rng = random.Random(12)
    plans = [plan(rng, i, shared) for i in range(REQUESTS)]
    todo: asyncio.Queue = asyncio.Queue()
    for p in plans:
        todo.put_nowait(p)
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=CLIENTS * 2)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        async def worker(seed: int):
            wrng = random.Random(seed)
            while not todo.empty() and time.monotonic() - t0 < DEADLINE:
                kind, body = todo.get_nowait()
                for attempt in range(RETRIES + 1):  # a 503 says "retry later": clients do
                    out = await one(client, wrng, kind, body)
                    out.retries = attempt
                    if out.status != 503:
                        break
                    await asyncio.sleep(wrng.uniform(0.05, 0.2))
                outcomes.append(out)
                await asyncio.sleep(wrng.uniform(0, 0.05))

        await asyncio.gather(*(worker(s) for s in range(CLIENTS)))
    return outcomes, time.monotonic() - t0


@pytest.fixture(params=["plain", "host-tier"])
def soak_server(request):
    return request.param, request.getfixturevalue(
        "rel_server" if request.param == "plain" else "rel_tier_server")


def test_soak(soak_server, rel_ref, monkeypatch):
    variant, rel_server = soak_server
    tier = variant == "host-tier"
    engine = rel_server.aengine.engine
    step, steps = engine.step, itertools.count(1)

    def model_paced_step():  # a few ms a step, as a real model takes: requests overlap more
        time.sleep(STEP_SECONDS)
        if next(steps) % FAULT_EVERY == 0:
            fail_inside_the_step(engine.runner)
        return step()

    monkeypatch.setattr(engine, "step", model_paced_step)
    metrics_before = rel_server.metrics()
    outcomes, elapsed = asyncio.run(soak(rel_server.url, shared=tier))
    # afterwards the server is idle, with every block back
    rel_server.wait_metric(RUNNING, lambda v: v == 0, timeout=15)
    rel_server.wait_metric(KV, lambda v: v == 0.0, timeout=15)
    bm_free, bm_total, requests_left = on_engine_thread(rel_server.aengine, lambda e: (
        e.block_manager.check_invariants(), e.swap_space and e.swap_space.check_invariants(),
        e.block_manager.num_free, e.block_manager.num_blocks, len(e.requests))[2:])
    leaked = bm_total - bm_free
    with httpx.Client(base_url=rel_server.url) as http:
        assert http.get("/health").status_code == 200
    metrics = rel_server.metrics()

    unexpected = [o for o in outcomes if o.error is not None
                  or (o.status not in (None, 200, 400, 500, 503))
                  or (o.status == 500 and FAILED_STEP not in (o.text or ""))
                  or (o.status == 400) != (o.kind == "bad")
                  or (o.status == 503 and "overloaded" not in (o.text or ""))]
    served = [o for o in outcomes if o.status == 200 and o.kind in ("greedy", "sampled")]
    rejected = [o for o in outcomes if o.status in (400, 503)]
    aborted = [o for o in outcomes if o.status is None]
    faulted = [o for o in outcomes if o.status == 500]
    greedy = [o for o in served if o.kind == "greedy"]
    mismatched = []
    refs: dict[tuple, str] = {}
    for o in greedy:  # the sequential result: LLM.generate, one request at a time
        key = (o.prompt, o.max_tokens, o.ignore_eos)
        if key not in refs:
            out = rel_ref.generate([o.prompt], SamplingParams(
                temperature=0.0, max_tokens=o.max_tokens, ignore_eos=o.ignore_eos),
                use_tqdm=False)[0].outputs[0]
            refs[key] = out.text
        if o.text != refs[key]:
            mismatched.append((o, refs[key]))
    preemptions = (metrics[("pagedjax:num_preemptions_total", "")]
                   - metrics_before[("pagedjax:num_preemptions_total", "")])
    aborts = (metrics[("pagedjax:request_success_total", "abort")]
              - metrics_before[("pagedjax:request_success_total", "abort")])
    offload_hits = (metrics.get(("pagedjax:external_prefix_cache_hits_total", ""), 0)
                    - metrics_before.get(("pagedjax:external_prefix_cache_hits_total", ""), 0))
    FIGURES.append(
        f"soak ({variant}): {len(outcomes)} requests in {elapsed:.1f} s from {CLIENTS} clients: "
        f"{len(served)} served ({len(greedy)} greedy compared), {len(aborted)} aborted by the "
        f"client ({aborts:.0f} aborts counted by the server), {len(faulted)} failed by "
        f"{next(steps) // FAULT_EVERY} injected device faults, {len(rejected)} rejected "
        f"({sum(o.status == 503 for o in rejected)} x 503 overloaded after {RETRIES} retries, "
        f"{sum(o.status == 400 for o in rejected)} x 400; {sum(o.retries for o in outcomes)} "
        f"503s retried), {len(unexpected)} unexpected errors, "
        f"blocks leaked {leaked}, outputs mismatched {len(mismatched)}, "
        f"{preemptions:.0f} preemptions" + (f", {offload_hits:.0f} host-tier hit tokens"
                                             if tier else ""))
    assert not unexpected, unexpected[:5]
    assert leaked == 0 and requests_left == 0
    assert not mismatched, mismatched[:3]
    assert len(outcomes) >= REQUESTS // 2, "the soak made too little progress"
    assert greedy and aborted and faulted and preemptions > 0, \
        "the soak did not exercise what it claims"
    assert not tier or offload_hits > 0, "the host tier was never hit"

"""Disconnects abort and free blocks; a full waiting queue answers 503; /metrics and the periodic
log line say what the engine is doing."""
import contextlib
import logging
import re
import time

import httpx
import pytest
import uvicorn

from pagedjax.entrypoints.server.app import build_app
from tests.server.conftest import API_KEY, MODEL, start_uvicorn

LONG = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "temperature": 0,
        "ignore_eos": True}
KV, ABORTS = "pagedjax:kv_cache_usage_perc", "pagedjax:request_success_total"


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, slow_engine):
    aborts = server.metrics()[(ABORTS, "abort")]
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 3:
                    assert server.metrics()[(KV, "")] > 0, "a running request holds blocks"
                    break  # closes the connection with ~45 tokens still to go (>= 0.9 s)
    server.wait_metric(ABORTS, lambda v: v == aborts + 1, label="abort", timeout=5)
    server.wait_metric(KV, lambda v: v == 0.0, timeout=5)
    assert server.metrics()[("pagedjax:num_requests_running", "")] == 0


def test_abandoned_openai_chat_stream_aborts_and_frees_blocks(server, slow_engine):
    aborts = server.metrics()[(ABORTS, "abort")]
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True,
        extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client walks away after a few chunks
    server.wait_metric(ABORTS, lambda v: v == aborts + 1, label="abort", timeout=5)
    server.wait_metric(KV, lambda v: v == 0.0, timeout=5)
    assert server.metrics()[("pagedjax:num_requests_running", "")] == 0


def test_client_timeout_on_a_plain_request_aborts_it(server, slow_engine):
    aborts = server.metrics()[(ABORTS, "abort")]
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=LONG, timeout=0.3)
    server.wait_metric(ABORTS, lambda v: v == aborts + 1, label="abort", timeout=5)
    server.wait_metric(KV, lambda v: v == 0.0, timeout=5)


def test_503_while_the_waiting_queue_is_over_the_limit(server, slow_engine):
    # A second app over the same engine, with room for 2 waiting sequences.
    app = build_app(server.aengine, MODEL, API_KEY, max_waiting_requests=2)
    small = start_uvicorn(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                        log_level="warning")))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with server.http() as http, contextlib.ExitStack() as streams:
            for _ in range(6):  # 4 run (--max-num-seqs 4), 2 wait
                r = streams.enter_context(http.stream("POST", "/v1/completions",
                                                      json={**LONG, "stream": True}))
                assert r.status_code == 200
            server.wait_metric("pagedjax:num_requests_waiting", lambda v: v >= 2, timeout=5)
            r = httpx.post(f"{small.url}/v1/completions", json={**LONG, "max_tokens": 2},
                           headers=headers, timeout=10)
            assert r.status_code == 503, r.text
            assert "overloaded" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"
        server.wait_metric(KV, lambda v: v == 0.0, timeout=5)  # the 6 streams were aborted
        r = httpx.post(f"{small.url}/v1/completions", json={**LONG, "max_tokens": 2},
                       headers=headers, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        small.stop()


def test_metrics_expose_vllm_names_with_live_values(server):
    server.client().completions.create(model=MODEL, prompt="count me", max_tokens=5,
                                       extra_body={"ignore_eos": True})
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "kv_cache_usage_perc", "cpu_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert (f"pagedjax:{name}", "") in m, name
    assert m[("pagedjax:prompt_tokens_total", "")] >= len("count me")
    assert m[("pagedjax:generation_tokens_total", "")] >= 5
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        assert m[(f"pagedjax:{name}_count", "")] >= 1, name
        assert m[(f"pagedjax:{name}_sum", "")] > 0, name
    assert m[(ABORTS, "length")] >= 1
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'pagedjax:num_requests_running{{model_name="{MODEL}"}}' in text


LOG_LINE = re.compile(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: "
                      r"[\d.]+ tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, Swapped: \d+ reqs, "
                      r"GPU KV cache usage: [\d.]+%")


def test_periodic_stats_log_line(server, caplog):
    caplog.set_level(logging.INFO, logger="pagedjax.entrypoints.server.engine_loop")
    server.client().completions.create(model=MODEL, prompt="log me", max_tokens=8)
    deadline = time.monotonic() + 5  # the server logs every 0.3 s while it has work
    while not any(LOG_LINE.search(r.getMessage()) for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)


def test_serve_flags_default_to_localhost_and_vllm_names():
    import argparse

    from pagedjax.entrypoints.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-model-len", "128", "--max-num-seqs", "8"])
    assert (args.host, args.port, args.max_request_bytes) == ("127.0.0.1", 8000, 1 << 20)
    assert (args.max_model_len, args.max_num_seqs, args.served_model_name) == (128, 8, None)


def test_a_failing_engine_step_fails_requests_and_health(tok_model, monkeypatch):
    from pagedjax.engine import LLMEngine
    from pagedjax.config import EngineArgs
    from pagedjax.entrypoints.server.engine_loop import AsyncEngine
    from pagedjax.entrypoints.server.metrics import EngineMetrics
    from tests.server.conftest import ENGINE_ARGS

    engine = LLMEngine(EngineArgs(**ENGINE_ARGS), loaded=tok_model)

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)
    aengine = AsyncEngine(engine, EngineMetrics(MODEL), log_stats=False).start()
    running = start_uvicorn(uvicorn.Server(uvicorn.Config(
        build_app(aengine, MODEL), host="127.0.0.1", port=0, log_level="critical")))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    try:
        with httpx.Client(base_url=running.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
            assert http.get("/health").status_code == 503
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    finally:
        running.stop()
        aengine.shutdown()

"""Tokenisation runs off the event loop, on one bounded queue: while big prompts are being
tokenised, /health and requests that need no tokenizer are answered, and prompts past the bound
get 503 at once. The tokenizer is held in a gate the test opens, so nothing depends on timing:
were tokenisation on the event loop, the gate would block the loop and /health would not answer.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import types

import httpx
import pytest

from pagedjax.entrypoints.server import serving as serving_module
from tests.server.conftest import API_KEY, MODEL

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BIG = "All work and no play makes Jack a dull boy. " * 17_500  # ~770 KB


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def gate(server, monkeypatch):
    """Every prompt the handlers tokenise waits for ``gate.open`` (set, at the latest, at the end
    of the test); ``gate.entered`` is set once one is waiting. Past the gate the tokenizer gets
    the first 100 characters of each text (the char tokenizer takes seconds over 770 KB): what is
    tested is where the work runs, and 100 characters are still over max_model_len."""
    serving = server.app.state.serving
    gate = types.SimpleNamespace(open=threading.Event(), entered=threading.Event())

    def wait():
        gate.entered.set()
        assert gate.open.wait(60), "the test never opened the gate"

    def encode(text, encode=serving._encode):
        wait()
        return encode(text[:100])

    def chat_prompt_ids(tok, messages, *args, chat_prompt_ids=serving_module.chat_prompt_ids,
                        **kw):
        wait()
        return chat_prompt_ids(tok, [{**m, "content": m["content"][:100]} for m in messages],
                               *args, **kw)

    monkeypatch.setattr(serving, "_encode", encode)
    monkeypatch.setattr(serving_module, "chat_prompt_ids", chat_prompt_ids)
    yield gate
    gate.open.set()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=HEADERS, timeout=60)


def test_big_prompts_do_not_stall_health_or_other_requests(server, gate):
    bodies = [("/v1/completions", {"model": MODEL, "prompt": BIG, "max_tokens": 1})] * 7 + [
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                  "messages": [{"role": "user", "content": BIG}]})]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        big = [pool.submit(post, server.url, path, body) for path, body in bodies]
        assert gate.entered.wait(30), "no prompt reached the tokenizer"
        # the tokenizer thread is busy (held in the gate) with 8 big prompts queued
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        r = post(server.url, "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7],
                                                 "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        assert not any(f.done() for f in big)
        gate.open.set()
        for f in big:  # every big prompt is answered, none lost: each is over max_model_len
            r = f.result(timeout=120)
            assert r.status_code == 400 and "max_model_len is 64" in r.text, r.text


def test_prompts_past_the_tokenizer_queue_get_503(server, gate, monkeypatch):
    tokens = server.app.state.serving.tokens
    monkeypatch.setattr(tokens, "max_queued", 2)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    with cf.ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(post, server.url, "/v1/completions", body) for _ in range(2)]
        wait_for(lambda: tokens._queued == 2, "two prompts queued")
        r = post(server.url, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                                      "messages": [{"role": "user",
                                                                    "content": "hi"}]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        err = r.json()["error"]
        assert err["code"] == "overloaded" and "--max-tokenizer-queue 2" in err["message"]
        gate.open.set()
        assert [f.result(timeout=60).status_code for f in queued] == [200, 200]
    wait_for(lambda: tokens._queued == 0, "the queue to empty")
    assert post(server.url, "/v1/completions", body).status_code == 200


def test_a_burst_of_64_text_prompts_waits_for_the_tokenizer(server, gate):
    """vLLM's benchmark client at --max-concurrency 64 sends 64 text prompts at once: by default
    they all queue for the tokenizer (its bound is --max-waiting-requests), none gets 503."""
    tokens = server.app.state.serving.tokens
    assert tokens.max_queued == server.app.state.serving.max_waiting_requests
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    with cf.ThreadPoolExecutor(64) as pool:
        burst = [pool.submit(post, server.url, "/v1/completions", body) for _ in range(64)]
        wait_for(lambda: tokens._queued == 64, "64 prompts queued")
        gate.open.set()
        codes = [f.result(timeout=120).status_code for f in burst]
    assert codes == [200] * 64, codes

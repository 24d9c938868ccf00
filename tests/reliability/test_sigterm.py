"""SIGTERM drains a real ``pagedjax serve`` process on 127.0.0.1: new requests and /health get 503
at once, a short in-flight stream finishes, a long one is cut at --drain-timeout with a 503
``shutting_down`` error event, and the process exits 0."""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.reliability.conftest import FIGURES
from tests.server.conftest import char_tokenizer

# A tiny dummy-weight Qwen2 with the server tests' char tokenizer (a stream without a tokenizer
# has no text to send before its end).
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128,
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
DRAIN = 2.0
# 8000 decode steps take seconds on any machine (the host side of a step alone is ~0.3 ms), so
# LONG is still running when the drain ends; SHORT's 8 steps end well within it.
LONG = {"model": "tiny", "prompt": "hello", "max_tokens": 8000, "ignore_eos": True,
        "stream": True}
SHORT = {**LONG, "max_tokens": 8}


def _events(lines):
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: "):]


def test_sigterm_drains_then_exits_0(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    char_tokenizer(CONFIG["vocab_size"]).save_pretrained(tmp_path / "tokenizer")
    argv = [sys.executable, "-m", "pagedjax.entrypoints.cli", "serve", "--load-format", "dummy",
            "--model", str(tmp_path / "config.json"), "--tokenizer", str(tmp_path / "tokenizer"),
            "--served-model-name", "tiny",
            "--port", "0", "--max-model-len", "8192", "--block-size", "128",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "256",
            "--num-gpu-blocks-override", "160", "--drain-timeout", str(DRAIN),
            "--uvicorn-log-level", "info", "--disable-log-stats"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: queue.Queue[str] = queue.Queue()
    lines: list[str] = []

    def pump():  # keeps the pipe from filling; lines also kept for the failure message
        for line in proc.stderr:
            lines.append(line)
            log.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = _wait_for_url(log, proc, lines, timeout=90)
        with httpx.Client(base_url=url, timeout=30) as http:
            warm = http.post("/v1/completions", json={**SHORT, "stream": False})  # compiles
            assert warm.status_code == 200, warm.text
            long_events, short_events = [], []
            with http.stream("POST", "/v1/completions", json=LONG) as long_r, \
                    http.stream("POST", "/v1/completions", json=SHORT) as short_r:
                long_lines, short_lines = long_r.iter_lines(), short_r.iter_lines()
                long_events.append(next(_events(long_lines)))  # both are running
                short_events.append(next(_events(short_lines)))
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                _wait_for(log, "SIGTERM: draining", proc, lines, timeout=10)
                refused = http.post("/v1/completions", json={**SHORT, "stream": False})
                health = http.get("/health")
                short_events += list(_events(short_lines))
                long_events += list(_events(long_lines))
                cut_after = time.monotonic() - t0
            code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = "".join(lines)
    assert code == 0, out[-3000:]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    short_chunks = [json.loads(e) for e in short_events[:-1]]
    assert short_events[-1] == "[DONE]"
    assert short_chunks[-1]["choices"][0]["finish_reason"] == "length", "SHORT finished"
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert error["code"] == "shutting_down" and "--drain-timeout" in error["message"], error
    assert DRAIN - 0.5 <= cut_after <= DRAIN + 10, cut_after
    tokens = sum(len(json.loads(e)["choices"]) for e in long_events[:-2])
    assert tokens < LONG["max_tokens"]
    FIGURES.append(f"sigterm: short stream finished, long stream cut after {cut_after:.1f} s "
                   f"(--drain-timeout {DRAIN}) with 503 shutting_down after {tokens} chunks, "
                   f"new request 503, exit code {code}")


def _wait_for(log: queue.Queue, pattern: str, proc, lines, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = log.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            line = ""
        m = re.search(pattern, line)
        if m:
            return m
        assert proc.poll() is None or not log.empty(), "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n" + "".join(lines)[-3000:]


def _wait_for_url(log, proc, lines, timeout: float) -> str:
    m = _wait_for(log, r"Uvicorn running on (http://127\.0\.0\.1:\d+)", proc, lines, timeout)
    return m.group(1)

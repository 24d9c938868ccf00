"""The serve scenario end to end on the CPU: it starts a real `pagedjax serve` process (tiny random
Qwen2) on 127.0.0.1, drives it with its async HTTP client at two arrival rates, and its JSON adds
up: every request succeeded with exactly its tokens, the client's token counts equal the server's
counters, and nothing compiled after the warm-up. Plus the pure parts: arrivals and figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import serve, serving_client
from benchmarks.__main__ import main

N, IN, OUT, CONC = 8, 8, 4, 4
TINY = ["--tiny", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
        "--kv-cache-memory-bytes", "65536"]


def test_serve_scenario_tiny(tmp_path, capsys):
    summary = main(["serve", "--out", str(tmp_path), *TINY, "--num-prompts", str(N),
                    "--input-len", str(IN), "--output-len", str(OUT), "--max-concurrency",
                    str(CONC), "--request-rate", "inf,40", "--server-timeout", "300"])
    printed = capsys.readouterr().out
    assert printed.count("Serving Benchmark Result") == 2 and "Median ITL (ms):" in printed
    record = json.loads((tmp_path / "serve.json").read_text())
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert record["device"].startswith("cpu") and "serve" in record["command"]
    assert summary["all_succeeded"] is True and summary["compilations_after_warmup"] == 0
    fig = record["figures"]
    assert [r["request_rate"] for r in fig["rows"]] == ["inf", "40"]
    assert fig["rows"][0]["warmup_compilations"] >= 1, "the server's compilation counter counts"
    for row, requests in zip(fig["rows"], fig["requests"]):
        assert (row["completed"], row["failed"]) == (N, 0), row["errors"]
        assert row["total_input_tokens"] == N * IN and row["total_output_tokens"] == N * OUT
        # the client's counts are the server's
        assert row["server"]["prompt_tokens"] == N * IN
        assert row["server"]["generation_tokens"] == N * OUT
        assert row["compilations"] == 0 and row["peak_concurrency"] <= CONC
        assert row["output_throughput"] * row["duration"] == pytest.approx(N * OUT)
        assert row["request_throughput"] == pytest.approx(N / row["duration"])
        assert 0 < row["median_ttft_ms"] <= row["p99_ttft_ms"]
        assert 0 < row["median_itl_ms"] <= row["p99_itl_ms"] and row["mean_tpot_ms"] > 0
        assert len(requests) == N
        for r in requests:
            assert r["ok"] and r["output_tokens"] == OUT and 1 <= r["chunks"] <= OUT
            assert 0 < r["ttft_ms"] <= r["latency_ms"]
    assert summary["median_ttft_ms"] == fig["rows"][0]["median_ttft_ms"]
    assert summary["rate40_output_throughput"] == fig["rows"][1]["output_throughput"]
    assert (tmp_path / "serve.png").exists()


def test_arrivals_are_seeded_poisson():
    gaps = serving_client.arrival_gaps(20_000, rate=4.0, burstiness=1.0, seed=0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    gaps = serving_client.arrival_gaps
    assert (gaps(5, 4.0, 1.0, seed=3) == gaps(5, 4.0, 1.0, seed=3)).all()
    assert not gaps(4, math.inf, 1.0, seed=0).any()


def test_figures_follow_vllm_definitions():
    def req(ttft, gaps, n):
        r = serving_client.RequestResult(prompt_len=10, ok=True, output_tokens=n, ttft=ttft,
                                itl=list(gaps), chunks=len(gaps) + 1)
        r.latency = ttft + sum(gaps)
        return r

    failed = serving_client.RequestResult(prompt_len=10, error="HTTP 503")
    m = serve.metrics([req(0.1, [0.02, 0.02, 0.02], 4), req(0.3, [0.04], 2), failed], 2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (20, 6)
    assert m["output_throughput"] == 3.0 and m["total_token_throughput"] == 13.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT excludes the first token: (latency - ttft) / (n - 1)
    assert m["mean_tpot_ms"] == pytest.approx((20.0 + 40.0) / 2)
    assert m["median_itl_ms"] == pytest.approx(20.0) and m["tokens_per_chunk"] == 1.0


def test_synthetic_tokenizer_streams_every_token(tmp_path):
    from transformers import AutoTokenizer

    folder = serving_client.synthetic_tokenizer(512, tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 512
    assert tok.decode([5, 511]) == "w5 w511"
    assert all(tok.decode([i]) for i in np.random.default_rng(0).integers(0, 512, 20).tolist())

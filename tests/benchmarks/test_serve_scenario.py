"""The serve scenario end to end on the CPU: it starts a real `pagedjax serve` process (tiny random
Qwen2) on 127.0.0.1, drives it with its async HTTP client at two arrival rates, and its JSON adds
up: every request succeeded with exactly its tokens, the client's token counts equal the server's
counters, and nothing compiled after the warm-up. Plus the pure parts: arrivals and figures."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from benchmarks import serve, serve_steps, serving_client
from benchmarks.__main__ import main

N, IN, OUT, CONC = 8, 8, 4, 4
TINY = ["--tiny", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
        "--kv-cache-memory-bytes", "65536"]


def test_serve_scenario_tiny(tmp_path, capsys):
    trace = tmp_path / "steps.jsonl"
    summary = main(["serve", "--out", str(tmp_path), *TINY, "--step-trace", str(trace),
                    "--num-prompts", str(N),
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
        # the server's step trace accounts for every token of the measured run
        steps = row["steps"]
        assert steps["traced_generated_tokens"] == N * OUT
        assert steps["traced_prefill_tokens"] == N * IN
        assert steps["steps"] >= OUT and steps["steps_per_s"] > 0
        assert steps["decode_steps"] + steps["mixed_steps"] + steps["prefill_steps"] == \
            steps["steps"]
        assert 0 < steps["engine_busy_pct"] <= 100 and steps["step_gap_ms_mean"] >= 0
        assert 0 < steps["decode_step_ms_p50"] and steps["mean_decode_rows"] <= CONC
        for r in requests:
            assert r["ok"] and r["output_tokens"] == OUT and 1 <= r["chunks"] <= OUT
            assert 0 < r["ttft_ms"] <= r["latency_ms"]
    assert summary["median_ttft_ms"] == fig["rows"][0]["median_ttft_ms"]
    assert summary["rate40_output_throughput"] == fig["rows"][1]["output_throughput"]
    assert summary["engine_busy_pct"] == fig["rows"][0]["steps"]["engine_busy_pct"]
    # every line of the whole trace (warm-ups too) parses and adds up: each request's tokens
    lines = [json.loads(t) for t in trace.read_text().splitlines()]
    assert {"t", "prefill", "decode", "first", "step_ms", "gap_ms", "idle_ms", "deliver_ms",
            "host_ms", "device_ms"} <= set(lines[0])
    warm = 2 * min(N, 2 * CONC)  # the warm-up requests of both rates
    assert sum(s["decode"] + s["first"] for s in lines) == (2 * N + warm) * OUT
    assert sum(s["prefill"] for s in lines) == (2 * N + warm) * IN
    assert all(s["step_ms"] >= 0 and s["gap_ms"] + 1e-3 >= s["idle_ms"] >= 0 for s in lines)
    assert (tmp_path / "serve.png").exists()


def test_arrivals_are_seeded_poisson():
    gaps = serving_client.arrival_gaps(20_000, rate=4.0, burstiness=1.0, seed=0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    gaps = serving_client.arrival_gaps
    assert (gaps(5, 4.0, 1.0, seed=3) == gaps(5, 4.0, 1.0, seed=3)).all()
    assert not gaps(4, math.inf, 1.0, seed=0).any()


def test_request_rates_refuse_what_has_no_arrival_process(capsys):
    assert serving_client.request_rates("4,0.5,inf") == [4.0, 0.5, math.inf]
    for bad in ("0", "-2", "nan", ",", "4,4"):
        with pytest.raises(argparse.ArgumentTypeError, match="inf|once"):
            serving_client.request_rates(bad)
    # the serve scenario's flag takes the same parser: a zero rate is refused at parse time
    with pytest.raises(SystemExit):
        main(["serve", "--tiny", "--request-rate", "8,0"])
    assert "give requests/s > 0 or inf" in capsys.readouterr().err


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


def test_step_figures_by_kind():
    def step(prefill, decode, first, ms):
        return {"t": 0.0, "prefill": prefill, "decode": decode, "first": first, "step_ms": ms,
                "host_ms": 1.0, "device_ms": ms - 1, "gap_ms": 2.0, "idle_ms": 0.5,
                "deliver_ms": 0.5}

    steps = [step(8, 0, 1, 10.0), step(4, 3, 1, 6.0), step(0, 4, 0, 4.0), step(0, 4, 0, 2.0),
             step(0, 0, 0, 1.0)]
    for i, s in enumerate(steps):
        s["t"] = 0.075 * i / 4  # the last one begins at 75 ms, ends 25 ms later
    steps[-1]["deliver_ms"] = 24.0
    f = serve_steps.figures(steps)
    assert f["wall_s"] == pytest.approx(0.1)
    assert (f["steps"], f["empty_steps"], f["steps_per_s"]) == (4, 1, 40.0)
    assert (f["prefill_steps"], f["mixed_steps"], f["decode_steps"]) == (1, 1, 2)
    assert f["decode_step_ms_p50"] == 3.0 and f["mixed_step_ms_mean"] == 6.0
    assert f["mean_prefill_tokens"] == 3.0 and f["mean_decode_rows"] == 2.75
    assert f["mixed_step_share"] == 0.25 and f["traced_generated_tokens"] == 13
    assert f["engine_busy_pct"] == pytest.approx(23.0)
    assert f["step_gap_ms_mean"] == 2.0 and f["busy_gap_ms_mean"] == 1.5
    assert f["idle_pct"] == pytest.approx(2.0) and f["deliver_ms_mean"] == 5.2
    # the engine thread's time: 18 ms waiting for the device, 2 ms idle, the rest host work
    assert f["device_wait_pct"] == pytest.approx(18.0) and f["host_work_pct"] == pytest.approx(80.0)
    assert f["host_ms_mean"] == 1.0


def test_synthetic_tokenizer_streams_every_token(tmp_path):
    from transformers import AutoTokenizer

    folder = serving_client.synthetic_tokenizer(512, tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 512
    assert tok.decode([5, 511]) == "w5 w511"
    assert all(tok.decode([i]) for i in np.random.default_rng(0).integers(0, 512, 20).tolist())


def test_each_started_server_has_its_own_synthetic_tokenizer(monkeypatch):
    """The startup scenario starts two servers from one ``args``: the second must not be given
    the first one's tokenizer folder, which is deleted with the first server."""
    seen = []

    class Proc:
        def __init__(self, argv, env):
            folder = argv[argv.index("--tokenizer") + 1]
            seen.append((folder, (serving_client.Path(folder) / "tokenizer.json").is_file()))

        def poll(self):
            return 0

    monkeypatch.setattr(serving_client.subprocess, "Popen", Proc)
    monkeypatch.setattr(serving_client, "_wait_healthy", lambda url, proc, timeout: None)
    args = argparse.Namespace(model="Qwen2.5-7B-Instruct", tiny=True, tokenizer=None,
                              num_prompts=1, server_timeout=1, server_arg=[])
    monkeypatch.setattr(serving_client, "_engine_flags", lambda args, model: [
        "--tokenizer", args.tokenizer])
    for _ in range(2):
        with serving_client.started_server(args, 64, {}):
            pass
        assert args.tokenizer is None
    assert [ok for _, ok in seen] == [True, True] and seen[0][0] != seen[1][0]

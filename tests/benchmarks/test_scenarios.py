"""Every benchmark scenario of issue 8 runs end to end on the CPU with a tiny random model, through
the real CLI entry point, so the CLI cannot rot. Sizes keep every run to one or two step shapes
(max_model_len <= 256, 16-token steps, 4 sequences): the point is the plumbing, not the numbers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import harness, report
from benchmarks.__main__ import main

# 65536 bytes of KV pool = 256 tokens of the tiny model (1 layer x 2 KV heads x 16 x 2 x float32)
TINY = ["--tiny", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
        "--kv-cache-memory-bytes", "65536"]


def _run(tmp_path, scenario: str, *argv: str) -> tuple[dict, dict]:
    summary = main([scenario, "--out", str(tmp_path), *TINY, *argv])
    record = json.loads((tmp_path / f"{scenario}.json").read_text())
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert record["device"].startswith("cpu") and record["command"]
    assert summary["compilations_after_warmup"] == 0, "a measured run compiled a new step shape"
    return summary, record


def test_throughput_fixed_lengths(tmp_path):
    summary, record = _run(tmp_path, "throughput", "--input-len", "8", "--output-len", "4",
                           "--num-prompts", "6", "--max-model-len", "64")
    assert summary["output_tok_s"] > 0 and summary["total_tok_s"] > summary["output_tok_s"]
    measured = record["figures"]["measured"]
    assert (measured["prompt_tokens"], measured["output_tokens"]) == (6 * 8, 6 * 4)
    assert summary["requests_per_s"] == pytest.approx(6 / measured["elapsed_s"])
    assert (tmp_path / "throughput.png").exists()


def test_throughput_precompiled(tmp_path):
    """--precompile with the Pallas GPU kernels (interpreted here, coarse buckets as on a GPU):
    the engine compiles everything at start, so the warm-up pass and the measured run compile
    nothing, by construction."""
    summary, record = _run(tmp_path, "throughput", "--input-len", "8", "--output-len", "4",
                           "--num-prompts", "6", "--max-model-len", "64",
                           "--attention-backend", "pallas-gpu", "--precompile")
    assert summary["precompile"] is True and summary["precompile_compilations"] > 0
    assert summary["warmup_compilations"] == 0 and summary["precompile_s"] > 0


def test_throughput_sharegpt_like(tmp_path):
    summary = main(["throughput", "--out", str(tmp_path), *TINY, "--dataset", "sharegpt-like",
                    "--num-prompts", "6", "--max-model-len", "64"])
    record = json.loads((tmp_path / "throughput-sharegpt-like.json").read_text())
    assert record["summary"]["dataset"] == "sharegpt-like"
    assert summary["compilations_after_warmup"] == 0 and summary["output_tok_s"] > 0
    assert 4 <= summary["mean_input_len"] <= 32  # prompts clipped to half of max_model_len


def test_sharegpt_like_lengths_follow_the_documented_distribution():
    p, o = harness.sharegpt_like_lengths(20_000, seed=0, max_model_len=32768)
    assert p.min() >= 4 and p.max() <= 1024 and o.min() >= 4 and (p + o).max() <= 2048
    assert 190 < p.mean() < 230 and 185 < o.mean() < 225  # ~210 / ~200 tokens per request
    assert abs(np.median(p) - 120) <= 6 and abs(np.median(o) - 130) <= 6
    same = harness.sharegpt_like_lengths(50, seed=3, max_model_len=32768)
    again = harness.sharegpt_like_lengths(50, seed=3, max_model_len=32768)
    assert all((a == b).all() for a, b in zip(same, again)), "the seed must fix the lengths"


def test_latency(tmp_path):
    summary, record = _run(tmp_path, "latency", "--batch-sizes", "1,3", "--input-lens", "8",
                           "--output-len", "4", "--num-iters", "2", "--num-iters-warmup", "1")
    rows = record["figures"]["rows"]
    assert [(r["batch"], r["input_len"]) for r in rows] == [(1, 8), (3, 8)]
    for r in rows:
        assert 0 < r["e2e_p10_s"] <= r["e2e_p50_s"] <= r["e2e_p99_s"]
        assert r["tpot_p50_ms"] > 0 and r["ttft_p50_ms"] > 0
    assert summary["b3_in8_e2e_p50_s"] == rows[1]["e2e_p50_s"]
    parity = record["figures"]["backend_parity"]  # issue 4: Pallas (interpreted) vs reference
    assert parity["backends"] == {"reference": "reference", "pallas": "pallas-gpu"}
    assert parity["identical"] and summary["greedy_identical_reference_vs_pallas"]
    assert [len(t) for t in parity["pallas_tokens"]] == [4, 4, 4]


def test_step_profile(tmp_path):
    """The device loop replays the last engine step's inputs, kept through the engine's execute
    seam: a decode step of the whole batch, no new compilation."""
    summary, record = _run(tmp_path, "step-profile", "--batch-sizes", "2,3", "--input-len", "8",
                           "--steps", "3", "--trace-steps", "0")
    rows = record["figures"]["rows"]
    assert [r["batch"] for r in rows] == [2, 3]
    for r in rows:
        assert "decode=True" in r["layout"] and r["compilations"] == 0
        assert r["step_ms"] > 0 and r["device_loop_ms"] > 0 and r["tok_s_device_bound"] > 0
    assert summary["b3_step_ms"] == rows[1]["step_ms"]


def test_capacity_quick(tmp_path):
    summary, record = _run(tmp_path, "capacity", "--quick", "--max-model-lens", "32,64",
                           "--input-len", "8", "--output-len", "4")
    rows = {r["max_model_len"]: r for r in record["figures"]["rows"]}
    # the pool is the same whatever max_model_len; concurrency is pool tokens / max_model_len
    assert rows[32]["kv_cache_tokens"] == rows[64]["kv_cache_tokens"] == 256
    assert (summary["max_concurrency_32"], summary["max_concurrency_64"]) == (8, 4)
    assert rows[32]["requests"] == 8 and rows[64]["requests"] == 4  # --quick caps at 8
    assert summary["planner_matches_engine"] is True
    assert all(r["output_tok_s"] > 0 and r["preemptions"] == 0 for r in rows.values())
    assert (tmp_path / "capacity.png").exists()


def test_capacity_quick_fp8_kv(tmp_path):
    """--kv-cache-dtype fp8_e4m3: the same 65536-byte pool holds 1 byte per value instead of 2
    (static scales live in the model, not the pool): 2x the tokens, measured against an
    auto-dtype engine probed at the same memory."""
    summary, record = _run(tmp_path, "capacity", "--quick", "--max-model-lens", "64",
                           "--input-len", "8", "--output-len", "4", "--dtype", "bfloat16",
                           "--kv-cache-dtype", "fp8_e4m3", "--max-concurrency-cap", "4")
    fig = record["figures"]
    row, base = fig["rows"][0], fig["model_dtype_pool"]
    assert fig["kv_cache_dtype"] == "fp8_e4m3" and base["kv_cache_dtype"] == "auto"
    assert base["kv_cache_tokens"] == 65536 // (2 * 2 * 16 * 2) // 16 * 16 == 512
    assert row["kv_cache_tokens"] == 65536 // (16 * 2 * 2 * 16) * 16 == 1024
    assert summary["fp8_pool_token_ratio"] == 2.0
    assert fig["kv_bytes_per_token"] == 2 * 2 * 16
    assert summary["planner_matches_engine"] is True and row["output_tok_s"] > 0


def test_native_vs_paged_quick(tmp_path):
    summary, record = _run(tmp_path, "native-vs-paged", "--quick", "--max-model-len", "256",
                           "--b-max-batch", "2")
    fig = record["figures"]
    assert summary["case_a_completed"] is True
    # 256 pool tokens: one 256-token contiguous reservation, four 64-token paged requests
    assert summary["contiguous_seqs_same_budget"] == 1
    assert fig["paged"]["paged_seqs_8k_arithmetic"] == 4
    assert summary["concurrency_ratio_8k"] == summary["paged_8k_concurrent"] >= 1
    hf = fig["transformers"]["cases"]
    assert hf["a"]["status"] == "completed" and hf["a"]["new_tokens"] == 8
    assert hf["b"]["max_batch"] == 2 and hf["b"]["capped"]
    assert summary["speedup_vs_hf_b128"] > 0
    assert fig["paged"]["exit"] == 0 and fig["transformers"]["exit"] == 0


def test_report_renders_results_and_placeholders(tmp_path):
    main(["capacity", "--out", str(tmp_path / "cpu-test"), *TINY, "--quick",
          "--max-model-lens", "64", "--input-len", "8", "--output-len", "4", "--warmup", "none"])
    text = report.render(tmp_path, link_from=tmp_path / "README.md")
    assert "### capacity" in text and "| max_model_len |" in text
    assert "python -m benchmarks capacity" in text  # the command that produced the table
    assert "![capacity](cpu-test/capacity.png)" in text
    assert "### throughput\n\n_Not yet measured._" in text


def test_small_memory_quick(tmp_path):
    summary, record = _run(tmp_path, "small-memory", "--quick", "--configs", "bf16,int8,window",
                           "--skip-hf")
    assert summary["seed002_fits"] == ["bf16", "int8", "window"]
    rows = {r["config"]: r for r in record["figures"]["table"]["rows"]}
    assert rows["bf16"]["ttft_s"] > 0 and rows["bf16"]["decode_tok_s"] > 0
    # the same KV bytes hold more tokens at one byte a value (+ a scale a token); the "bf16"
    # configuration is the model's own dtype, float32 for the tiny CPU model: 3.5x here
    assert 3 < rows["int8"]["pool_tokens"] / rows["bf16"]["pool_tokens"] <= 4


def test_a_child_that_dies_leaves_its_last_words(tmp_path):
    """native-vs-paged / small-memory children run in their own process: one that dies before
    writing a result keeps its stderr's end in the result, and small-memory's row shows it."""
    from benchmarks.native_vs_paged import _child
    from benchmarks.small_memory import _row

    res = _child("native_jax", {"no": "load"}, dict(os.environ), 120, tmp_path)
    assert res["exit"] == 1 and res["cases"] == {}
    assert "KeyError: 'load'" in res["stderr_tail"][-1]
    assert _row("bf16", res)["note"].startswith("KeyError")

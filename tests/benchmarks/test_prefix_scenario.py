"""The prefix scenario end to end on the CPU (tiny random Qwen2): 4 conversations x 8 turns with
and without prefix caching, and its JSON adds up: 8 turns of 4 TTFTs each, prompts growing by a
user message and an answer a turn, every prompt token computed without caching, only the uncached
tail with it, a hit rate > 0 with caching and 0 without, no compilations after the warm-up."""
from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main

CONVS, TURNS, USER, ANSWER = 4, 8, 8, 4


def test_prefix_scenario_tiny(tmp_path):
    summary = main(["prefix", "--out", str(tmp_path), "--tiny", "--block-size", "8",
                    "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                    "--kv-cache-memory-bytes", "262144", "--num-conversations", str(CONVS),
                    "--turns", str(TURNS), "--user-len", str(USER), "--answer-len", str(ANSWER)])
    record = json.loads((tmp_path / "prefix.json").read_text())
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert record["device"].startswith("cpu") and "prefix" in record["command"]
    fig = record["figures"]
    assert summary["compilations_after_warmup"] == 0 and summary["preemptions"] == 0
    off, on = fig["no_cache"]["turns"], fig["cache"]["turns"]
    assert len(off) == len(on) == TURNS
    for t, (a, b) in enumerate(zip(off, on), start=1):
        prompt = t * USER + (t - 1) * ANSWER  # the history grows by a message and an answer
        for turn in (a, b):
            assert turn["turn"] == t and turn["prompt_len"] == prompt
            assert len(turn["ttft_ms"]) == CONVS and min(turn["ttft_ms"]) > 0
            assert turn["output_tokens"] == CONVS * ANSWER
        assert a["prefill_tokens"] == a["prompt_tokens"] == CONVS * prompt
        assert a["hits"] == a["queries"] == 0
        # with caching, exactly the tokens not found in the cache are computed
        assert b["prefill_tokens"] == b["prompt_tokens"] - b["hits"]
        if t >= 2:  # turn 1's 8 + 3 computed tokens fill one 8-token block
            assert b["hits"] > 0 and b["prefill_tokens"] < a["prefill_tokens"]
    assert summary["prefix_cache_hit_rate"] > 0 and summary["hit_rate_no_cache"] == 0
    assert summary["prefix_cache_hit_rate"] == pytest.approx(
        sum(b["hits"] for b in on) / sum(b["queries"] for b in on))
    last = fig["table"]["rows"][-1]
    assert summary["ttft_turn8_speedup"] == pytest.approx(
        last["ttft_mean_ms_no_cache"] / last["ttft_mean_ms_cache"]) and last["turn"] == TURNS
    assert summary["prefill_tokens_ratio"] > 1
    assert (tmp_path / "prefix.png").exists()

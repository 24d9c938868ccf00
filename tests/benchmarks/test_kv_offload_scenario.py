"""The kv-offload scenario end to end on the CPU (tiny random Qwen2): 4 conversations x 4 turns
through a GPU pool of half their working set (a quarter would not hold two conversations at full
length, the scenario's floor), prefix caching with and without its host tier. The JSON adds up:
the same answers both ways, histories found on the host tier after turn 1, fewer prefill tokens
with the tier, the tier's transfers recorded both ways, the raw bandwidth measured, no
compilations after the warm-up, the summary's keys."""
from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main

CONVS, TURNS, USER, ANSWER = 4, 4, 16, 4


def test_kv_offload_scenario_tiny(tmp_path):
    summary = main(["kv-offload", "--out", str(tmp_path), "--tiny", "--block-size", "8",
                    "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                    "--num-conversations", str(CONVS), "--turns", str(TURNS),
                    "--user-len", str(USER), "--answer-len", str(ANSWER)])
    record = json.loads((tmp_path / "kv-offload.json").read_text())
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert "kv-offload" in record["command"]
    for key in ("ttft_speedup_turn4plus", "throughput_ratio", "transfer_pct_raw_bw",
                "compilations_after_warmup"):
        assert summary[key] is not None, key
    assert summary["compilations_after_warmup"] == 0
    assert summary["answers_identical"] == 1.0
    # 4 chats x 4 turns of 20 tokens = 10 blocks each, 40 in all; the pool holds 2 chats
    assert summary["working_set_blocks"] == 40 and summary["gpu_pool_blocks"] == 20
    fig = record["figures"]
    off, on = fig["off"]["turns"], fig["on"]["turns"]
    assert len(off) == len(on) == TURNS
    assert all(t["host_hits"] == 0 for t in off)
    assert sum(t["host_hits"] for t in on[1:]) > 0 and summary["host_hit_rate"] > 0
    assert sum(t["prefill_tokens"] for t in on) < sum(t["prefill_tokens"] for t in off)
    assert summary["prefill_tokens_ratio"] > 1
    for d in ("store", "load"):
        moved = fig["on"][d]
        assert moved["blocks"] > 0 and moved["seconds"] > 0
        assert moved["link_bytes"] >= moved["payload_bytes"] > 0
    assert summary["raw_d2h_gb_s"] > 0 and summary["raw_h2d_gb_s"] > 0
    assert summary["transfer_pct_raw_bw"] == pytest.approx(
        100 * (fig["on"]["store"]["link_bytes"] / (summary["raw_d2h_gb_s"] * 1e9)
               + fig["on"]["load"]["link_bytes"] / (summary["raw_h2d_gb_s"] * 1e9))
        / (fig["on"]["store"]["seconds"] + fig["on"]["load"]["seconds"]))
    assert (tmp_path / "kv-offload.png").exists()

"""The kv-offload scenario end to end on the CPU (tiny random Qwen2): 4 conversations x 4 turns
through a GPU pool of half their working set (a quarter would not hold two conversations at full
length, the scenario's floor), prefix caching with and without its host tier. The JSON adds up:
the same answers both ways, histories found on the host tier after turn 1, fewer prefill tokens
with the tier, the tier's transfers recorded both ways, the raw bandwidth measured, no
compilations after the warm-up, the summary's keys."""
from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.__main__ import main
from benchmarks.kv_offload import arrival_offsets, send

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
    fig = record["figures"]["rates"]["inf"]
    assert summary["request_rates"] == ["inf"] and fig["summary"]["answers_identical"] == 1.0
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


# ---- arrivals at a rate (--request-rate) -----------------------------------------------------
class _Engine:
    """Stands in for the engine in ``send``: each request finishes after ``steps`` steps of at
    least ``step_s`` seconds; records each request's arrival time and when it was added."""

    def __init__(self, steps: int, step_s: float = 0.002):
        self.steps, self.step_s = steps, step_s
        self.added, self.left = {}, {}

    def add_request(self, rid, prompt, params, arrival_time, stream):
        self.added[rid] = (arrival_time, time.time())
        self.left[rid] = self.steps

    def step(self):
        time.sleep(self.step_s)
        outs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            if not self.left[rid]:
                del self.left[rid]
            outs.append(SimpleNamespace(request_id=rid, error=None, finished=rid not in self.left))
        return outs


def test_send_adds_each_request_at_its_arrival():
    e, offsets = _Engine(steps=3), [0.0, 0.05, 0.1, 0.25]
    outs, start, wall = send(e, [[1]] * 4, None, None, offsets, "r")
    assert [o.request_id for o in outs] == ["r-0", "r-1", "r-2", "r-3"]
    for i, off in enumerate(offsets):
        arrival, added = e.added[f"r-{i}"]
        assert arrival == pytest.approx(start + off, abs=1e-6)  # the schedule's, not the add's
        assert added >= arrival
    assert wall >= offsets[-1]


def test_send_holds_a_request_until_a_connection_frees():
    e = _Engine(steps=3)
    send(e, [[1]] * 3, None, 1, [0.0, 0.0, 0.0], "c")  # rate inf through one connection
    (a0, d0), (a1, d1), (a2, d2) = (e.added[f"c-{i}"] for i in range(3))
    # each waits for the one before to finish (3 steps of >= 2 ms): TTFT counts from then
    assert a1 >= d0 + 3 * e.step_s and a2 >= d1 + 3 * e.step_s
    assert a1 <= d1 and a2 <= d2
    e = _Engine(steps=3)
    start = send(e, [[1]] * 2, None, 1, [0.0, 0.3], "l")[1]
    assert e.added["l-1"][0] == pytest.approx(start + 0.3, abs=1e-6)  # due after the free


def test_arrivals_are_seeded():
    a = arrival_offsets(16, 4.0, 1.0, seed=3, turn=2)
    assert a[0] == 0 and np.all(np.diff(a) >= 0) and a[-1] > 0
    np.testing.assert_array_equal(a, arrival_offsets(16, 4.0, 1.0, seed=3, turn=2))
    assert not np.array_equal(a, arrival_offsets(16, 4.0, 1.0, seed=4, turn=2))
    assert not np.array_equal(a, arrival_offsets(16, 4.0, 1.0, seed=3, turn=3))
    # the same draws at every rate, scaled: a sweep compares rates on one pattern
    np.testing.assert_allclose(arrival_offsets(16, 2.0, 1.0, seed=3, turn=2), 2 * a)
    np.testing.assert_array_equal(arrival_offsets(16, math.inf, 1.0, seed=3, turn=2), 0)


@pytest.mark.parametrize("rates", ["0", "4,-1", "4,4", "nan", ","])
def test_request_rate_refuses_bad_lists(rates, capsys):
    with pytest.raises(SystemExit):
        main(["kv-offload", "--tiny", "--request-rate", rates])
    assert "--request-rate" in capsys.readouterr().err


def test_kv_offload_rates_tiny(tmp_path):
    """Two rates, no connection limit: one entry per rate, the same answers with and without the
    tier at each, arrivals as seeded in both modes, and TTFT counted from each arrival."""
    summary = main(["kv-offload", "--out", str(tmp_path), "--tiny", "--block-size", "8",
                    "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                    "--num-conversations", str(CONVS), "--turns", str(TURNS),
                    "--user-len", str(USER), "--answer-len", str(ANSWER),
                    "--request-rate", "4,inf", "--max-concurrency", "0", "--precompile",
                    "--warmup-turns", "1"])
    rates = json.loads((tmp_path / "kv-offload.json").read_text())["figures"]["rates"]
    assert list(rates) == summary["request_rates"] == ["4", "inf"]
    assert list(summary["ttft_speedup_turn4plus_by_rate"]) == ["4", "inf"]
    for key in ("ttft_speedup_turn4plus", "throughput_ratio", "host_hit_rate"):
        assert summary[key] == rates["4"]["summary"][key], key  # the first rate's
    assert summary["ttft_speedup_turn4plus_by_rate"]["inf"] == (
        rates["inf"]["summary"]["ttft_speedup_turn4plus"])
    for r in rates.values():
        assert r["summary"]["answers_identical"] == 1.0
        assert len(r["table"]["rows"]) == TURNS
        assert sum(t["host_hits"] for t in r["on"]["turns"]) > 0
        for row in r["table"]["rows"]:  # the wait to be scheduled is part of the TTFT
            for m in ("off", "on"):
                assert 0 <= row[f"queue_mean_ms_{m}"] <= row[f"ttft_mean_ms_{m}"]
    for mode in ("off", "on"):
        for t, turn in enumerate(rates["4"][mode]["turns"]):
            due = arrival_offsets(CONVS, 4.0, 1.0, seed=0, turn=t)
            assert turn["arrival_s"] == pytest.approx(due, abs=1e-4)
            # the seed puts the turn's last arrival >= 0.4 s after its first; a TTFT counted
            # from the turn's start would be at least that
            assert due[-1] >= 0.4 and turn["ttft_ms"][-1] < 1e3 * due[-1]
        assert all(a == 0 for turn in rates["inf"][mode]["turns"] for a in turn["arrival_s"])
    assert (tmp_path / "kv-offload.png").exists()

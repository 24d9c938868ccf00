"""The host-overhead scenario runs the engine's real schedule/prepare/postprocess around a fake
device step, and every sequence keeps decoding through the measured steps."""
from benchmarks.__main__ import main


def test_host_overhead_scenario_runs(tmp_path):
    summary = main(["host-overhead", "--batch-sizes", "4,8", "--prompt-len", "40", "--steps", "6",
                    "--out", str(tmp_path)])
    assert set(summary) >= {"host_ms_per_step_b4", "host_ms_per_step_b8"}
    assert all(v > 0 for k, v in summary.items() if k.startswith("host_ms"))

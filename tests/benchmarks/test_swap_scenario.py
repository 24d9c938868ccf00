"""The swap scenario runs end to end on a tiny model: all three policies complete every request,
the swap run really swaps, the recompute run really recomputes, and the JSON has its summary."""
import json

from benchmarks.__main__ import main


def test_swap_scenario_tiny(tmp_path):
    summary = main(["swap", "--tiny", "--warmup", "full", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "swap-tiny.json").read_text())
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert record["device"].startswith("cpu") and record["command"]
    assert summary["all_completed"] is True
    assert summary["compilations_after_warmup"] == 0
    for policy in ("no_pressure", "swap", "recompute"):
        assert summary[f"output_tok_s_{policy}"] > 0
    assert summary["swap_out_events"] > 0 and summary["swap_in_events"] > 0
    assert summary["preemptions_recompute"] > 0
    assert summary["swap_pct_raw_bw"] > 0 and summary["raw_d2h_gb_s"] > 0
    rows = {r["policy"]: r for r in record["figures"]["rows"]}
    assert rows["swap"]["swap_out_blocks"] == rows["swap"]["swap_in_blocks"] > 0
    assert rows["swap"]["preemptions_recompute"] == 0 and rows["recompute"]["swap_out_events"] == 0
    calm = rows["no-pressure"]
    assert calm["preemptions_swap"] == calm["preemptions_recompute"] == 0
    assert (tmp_path / "swap-tiny.png").exists()

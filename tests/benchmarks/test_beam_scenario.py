"""The beam scenario runs end to end on a tiny model, and its figures say what sharing saves."""
import json

from benchmarks.__main__ import main


def test_beam_scenario_tiny(tmp_path):
    summary = main(["beam", "--tiny", "--prompt-len", "64", "--output-len", "8",
                    "--num-requests", "2", "--max-model-len", "128", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "beam.json").read_text())
    assert record["summary"] == summary and record["device"]
    # 4 beams share the 4 prompt blocks; only the partly filled last one is copied per beam
    assert summary["beam_prompt_memory_ratio"] <= 1.0 + 3 / 4
    assert summary["beam_blocks_sharing_vs_not"] < 0.6
    assert summary["n4_blocks_sharing_vs_not"] < 0.6

"""``python -m benchmarks kernel --tiny`` runs end to end on the CPU (interpret mode), so the GPU
benchmark's code cannot rot between device runs."""
from __future__ import annotations

import json

from benchmarks.__main__ import main


def test_kernel_benchmark_tiny(tmp_path):
    summary = main(["kernel", "--tiny", "--out", str(tmp_path)])
    assert set(summary) >= {"decode_b64_ctx4096_pct_copy_bw", "decode_b64_ctx4096_speedup_vs_jax",
                            "decode_b1_ctx32768_pct_copy_bw", "prefill_8k_vs_cudnn",
                            "compilations_after_warmup"}
    assert summary["compilations_after_warmup"] == 0
    record = json.loads((tmp_path / "kernel-tiny.json").read_text())
    for name, check in record["figures"]["correctness"].items():
        assert check["rel_err"] < 1e-2 and not check["nan"] and check["padding_zero"], name
    decode = record["figures"]["decode"][0]
    assert decode["rel_err_vs_ref"] < 1e-2 and decode["rel_diff_vs_jax"] < 1e-2
    assert record["figures"]["prefill_best"]["causal"]["rel_err_vs_ref"] < 1e-2
    assert (tmp_path / "kernel-tiny.png").exists()

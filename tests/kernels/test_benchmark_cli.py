"""``python -m benchmarks kernel --tiny`` runs end to end on the CPU (interpret mode), so the GPU
benchmark's code cannot rot between device runs."""
from __future__ import annotations

import json

from benchmarks.__main__ import main


def test_kernel_benchmark_tiny(tmp_path):
    summary = main(["kernel", "--tiny", "--sweep", "--out", str(tmp_path)])
    assert set(summary) >= {"decode_b64_ctx4096_pct_copy_bw", "decode_b64_ctx4096_speedup_vs_jax",
                            "decode_b1_ctx32768_pct_copy_bw", "prefill_8k_vs_cudnn",
                            "compilations_after_warmup"}
    assert summary["compilations_after_warmup"] == 0
    # --kv-cache-dtype fp8_e4m3 is the default: decode timed on the same pages as raw fp8
    assert summary["kv_cache_dtype"] == "fp8_e4m3" and summary["fp8_decode_speedup"] is None
    record = json.loads((tmp_path / "kernel-tiny.json").read_text())
    checks = record["figures"]["correctness"]
    assert {"ragged-fp8_e4m3", "decode-fp8_e4m3", "decode-split4-fp8_e4m3"} <= set(checks)
    for name, check in checks.items():
        assert check["rel_err"] < 1e-2 and not check["nan"] and check["padding_zero"], name
    assert checks["write-fp8_e4m3"]["values_identical_frac"] == 1.0  # saturating, as the ref
    decode = record["figures"]["decode"][0]
    assert decode["rel_err_vs_ref"] < 1e-2 and decode["rel_diff_vs_jax"] < 1e-2
    assert decode["kv_rel_err_vs_ref"] < 1e-2 and decode["kv_speedup"] > 0
    assert decode["kv_rel_diff_vs_bf16"] < 0.1  # the quantization error itself, fp8 e4m3
    # --sweep: every tuning variant checked against the reference, then timed (or skipped when
    # the tiny shapes' single KV head cannot take it)
    for us, errs in ((decode["sweep"], decode["sweep_rel_err"]),
                     (decode["kv_sweep"], decode["kv_sweep_rel_err"])):
        assert any(isinstance(t, float) for t in us.values()), us
        for variant, t in us.items():
            assert isinstance(t, float) or t.startswith("skipped"), (variant, t)
            assert not isinstance(t, float) or errs[variant] < 1e-2, (variant, errs)
    assert isinstance(record["figures"]["kv_write_us"]["pallas_T4_fp8_e4m3_us"], float)
    assert record["figures"]["prefill_best"]["causal"]["rel_err_vs_ref"] < 1e-2
    assert (tmp_path / "kernel-tiny.png").exists()

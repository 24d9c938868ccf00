"""`pagedjax plan` end to end: JSON and tables, bad input, tensor parallelism, the host tier."""
from __future__ import annotations

import json

import pytest

from pagedjax.entrypoints import cli
from pagedjax.planning import memory_report as mr
from pagedjax.worker.kv_pool import GiB
from pagedjax.models import ModelConfig

from tests.planning.conftest import (
    QWEN25_7B, LLAMA2_70B, write_config, run_plan, plan_error, config, write_log)


def test_cli_json_end_to_end(capsys, qwen_dir, tmp_path, tokenizer_dir):
    log = write_log(tmp_path / "log.jsonl")
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--json",
                            "--requests", log, "--tokenizer", tokenizer_dir, "--max-tokens", 512,
                            "--target-concurrency", 8, "--max-model-len", 8192))
    assert r["kv_bytes_per_token"] == 57_344 and r["dtype"] == "bfloat16"
    mem = r["memory"]
    spec = mr.plan_pool(config(ModelConfig.from_hf(QWEN25_7B)))
    assert mem["num_blocks"] * spec.bytes_per_block == mem["bytes"]["kv_pool"]
    lens = [row["max_model_len"] for row in r["concurrency"]]
    assert lens == [2048, 4096, 8192, 16384, 32768]
    for row in r["concurrency"]:
        assert row["max_concurrency"] == mem["num_blocks"] // (row["max_model_len"] // 16)
    assert r["target"]["min_device_memory_gib"] < 80
    q = r["requests"]
    assert q["recommended_max_model_len"] == 624  # 99 + 512 -> 611, rounded up to 16
    assert q["max_concurrency"] == mem["num_blocks"] // (624 // 16)
    assert [e["line"] for e in q["malformed_lines"]] == [3, 7]


def test_human_table(capsys, qwen_dir, tmp_path, tokenizer_dir):
    out = run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--requests",
                   write_log(tmp_path / "log.jsonl"), "--tokenizer", tokenizer_dir)
    assert "57,344 B per token" in out and "32,768 (model max)" in out
    assert "P50 50  P95 95  P99 99" in out and "line 3: not valid JSON" in out


def test_budget_smaller_than_weights(capsys, qwen_dir):
    msg = plan_error(capsys, "--model", qwen_dir, "--gpu-memory", "12GiB")
    assert "smaller than the weights" in msg and "--tensor-parallel-size" in msg


def test_bad_inputs(capsys, qwen_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "environ", dict(os.environ))  # --device configures JAX's allocator
    assert "has no device memory to read" in plan_error(capsys, "--model", qwen_dir, "--device")
    assert "needs a tokenizer" in plan_error(
        capsys, "--model", qwen_dir / "config.json", "--requests", write_log(tmp_path / "l"))
    assert "larger than the model's maximum" in plan_error(
        capsys, "--model", qwen_dir, "--max-model-len", 65536)
    with pytest.raises(SystemExit):  # argparse: bad size
        cli.main(["plan", "--model", str(qwen_dir), "--gpu-memory", "80"])
    assert "81920MiB" in capsys.readouterr().err


def test_tensor_parallel_replication_is_reported(capsys, tmp_path):
    llama = write_config(tmp_path / "llama70b", LLAMA2_70B)
    r = json.loads(run_plan(capsys, "--model", llama, "--gpu-memory", "80GiB",
                            "--tensor-parallel-size", 16, "--json"))
    assert r["kv_heads_per_device"] == 1 and r["kv_heads_replicated"]
    assert any("replicated" in n for n in r["notes"])
    assert [row["max_model_len"] for row in r["concurrency"]] == [2048, 4096]



def test_host_kv_tier_is_planned_as_the_engine_sizes_it(capsys, qwen_dir):
    """--swap-space (swap mode) + --kv-offloading-size are one host pool, in one device's blocks
    (the engine's make_swap_space arithmetic), reported beside the GPU pool."""
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--json",
                            "--enable-prefix-caching", "--kv-offloading-size", 48,
                            "--preemption-mode", "swap", "--swap-space", 16))
    h, block = r["host_tier"], r["block_bytes"]
    assert h["blocks"] == 64 * GiB // block and h["tokens"] == h["blocks"] * 16
    assert h["gpu_pool_ratio"] == h["blocks"] / r["memory"]["num_blocks"]
    out = run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB",
                   "--enable-prefix-caching", "--kv-offloading-size", 48)
    assert f"host KV tier: {48 * GiB // block:,} blocks" in out
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--json", "--swap-space", 16))
    assert r["host_tier"] is None, "recompute mode uses no swap space"

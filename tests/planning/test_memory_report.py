"""The memory arithmetic the engine shares with `pagedjax plan`: KV bytes, weights, the
profiling peak, the pool a budget gives."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pagedjax.worker import kv_pool
from pagedjax.planning import memory_report as mr
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.kernels.reference import SCRATCH_BYTES
from pagedjax.worker.kv_pool import GiB
from pagedjax.models import ModelConfig

from tests.planning.conftest import QWEN25_7B, LLAMA2_70B, config, kv_bytes_per_token


def test_kv_bytes_per_token_bf16():
    qwen, llama = ModelConfig.from_hf(QWEN25_7B), ModelConfig.from_hf(LLAMA2_70B)
    assert kv_bytes_per_token(qwen) == 57_344
    assert kv_bytes_per_token(llama) == 327_680
    assert kv_bytes_per_token(llama, tp=8) == 327_680 // 8
    # 16 devices, 8 KV heads: each device still stores one whole head (replication).
    assert mr.kv_heads_per_device(llama, 16) == 1
    assert kv_bytes_per_token(llama, tp=16) == 327_680 // 8


def test_weights_per_device_shard_everything_but_norms():
    cfg = ModelConfig.from_hf(QWEN25_7B)
    one = mr.weights_bytes(cfg, "bfloat16")
    assert one == cfg.num_params() * 2
    assert abs(one / 1e9 - 15.2) < 0.1  # ANCHORS: 7.6 B parameters = 15.2 GB
    replicated_norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 2
    assert 2 * mr.weights_bytes(cfg, "bfloat16", tp=2) - one == replicated_norms


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="must divide the number of attention heads"):
        mr.per_device_config(ModelConfig.from_hf(QWEN25_7B), 8)


@settings(max_examples=50, deadline=None)
@given(budget=st.integers(0, 1 << 36), block_size=st.sampled_from([8, 16, 32]),
       dtype=st.sampled_from(["bfloat16", "float32"]))
def test_plan_pool_is_the_engines_for_budget(budget, block_size, dtype):
    cfg = ModelConfig.from_hf(QWEN25_7B)
    spec = mr.plan_pool(config(cfg, dtype, block_size=block_size), budget)
    assert spec == kv_pool.KVPoolSpec.for_budget(cfg, budget, block_size, dtype)
    assert spec.total_bytes <= budget < spec.total_bytes + spec.bytes_per_block
    assert spec.bytes_per_block == block_size * spec.bytes_per_token


def test_planner_pool_equals_the_engines_actual_pool_on_cpu(tiny_qwen):
    from pagedjax.engine import LLMEngine

    args = EngineArgs(kv_cache_memory_bytes=3_000_000, max_model_len=256, block_size=16)
    engine = LLMEngine(args, loaded=tiny_qwen)
    assert engine.config == EngineConfig.resolve(args, tiny_qwen.cfg, tiny_qwen.dtype)
    rep = mr.memory_report(engine.config)
    assert rep["num_blocks"] == engine.spec.num_blocks > 0
    assert rep["kv_pool_gib"] * GiB == engine.spec.total_bytes
    assert mr.plan_pool(engine.config, 3_000_000) == engine.spec


def test_memory_report_splits_the_device():
    cfg, total = ModelConfig.from_hf(QWEN25_7B), 80 * GiB
    rep = mr.memory_report(config(cfg), total_bytes=total)
    b = rep["bytes"]
    assert b["weights"] + b["profile_peak"] + b["kv_pool"] + b["free"] == total
    budget = int(total * 0.9) - b["weights"] - b["profile_peak"]
    assert b["kv_pool"] <= budget < b["kv_pool"] + rep["block_bytes"]
    assert rep["profile_peak_source"] == "estimate"
    measured = mr.memory_report(config(cfg), total_bytes=total, weights=15 * GiB,
                                profile_peak=2 * GiB)
    assert measured["profile_peak_source"] == "measured" and measured["weights_gib"] == 15


def test_profile_peak_estimate_formula():
    cfg = ModelConfig.from_hf(QWEN25_7B)
    t, s = 2048, 256
    layer = t * (2 * 3584 + (28 + 8) * 128 + 3 * 18944) * 2
    sampler = 6 * s * 152064 * 4  # the filter path's float32 rows
    autotune = 152064 * 3584 * 2  # the lm_head, the largest matrix, as the autotuner copies it
    assert mr.profile_peak_bytes_estimate(cfg, t, "bfloat16", s) == (
        layer + sampler + (512 << 20) + SCRATCH_BYTES + autotune)
    # int4 pages: the key write's copies of the blocks it re-quantizes (2048 / 16 + 2 x 256)
    int4_write = 4 * (128 + 512) * 16 * 4 * 128 * 4
    assert mr.profile_peak_bytes_estimate(cfg, t, "bfloat16", s, "int4", 16) == (
        layer + sampler + (512 << 20) + SCRATCH_BYTES + autotune + int4_write)


def test_min_device_bytes_is_the_smallest_that_fits():
    conf = config(ModelConfig.from_hf(QWEN25_7B))
    w, p = mr.weights_bytes(conf.model, "bfloat16"), 1 * GiB
    need = mr.min_device_bytes(conf, 64, w, p)

    def conc(total):
        return mr.plan_pool(conf, int(total * 0.9) - w - p).max_concurrency(32768)

    assert conc(need) >= 64 > conc(need - 1)


def test_parse_size():
    assert mr.parse_size("80GiB") == mr.parse_size("81920MiB") == 80 * GiB
    assert mr.parse_size("24GB") == 24 * 10**9
    assert mr.parse_size("1.5 gib") == int(1.5 * GiB)
    with pytest.raises(ValueError, match="80GiB, 24GB or 81920MiB"):
        mr.parse_size("80")

"""Tensor parallelism on 4 fake CPU devices: TP 1, 2 and 4 generate the same tokens with the same
logprobs, the pool and weights are split as the planner says, and a bad tp is refused clearly."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pagedjax import LLM
from pagedjax.worker import sharding
from pagedjax.planning.memory_report import weights_bytes
from tests.scaleout.common import generate_tp, tiny


@functools.cache
def run(name: str, tp: int):
    return generate_tp(tiny(name), tp)


def _device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


@pytest.mark.parametrize("name", ["tiny_qwen", "tiny_llama"])
def test_tp_1_2_4_same_tokens_and_logprobs(name):
    _, base = run(name, 1)
    for tp in (2, 4):
        llm, outs = run(name, tp)
        for b, o in zip(base, outs):
            assert o["token_ids"] == b["token_ids"], f"tp {tp}"
            for lb, lo in zip(b["logprobs"], o["logprobs"]):  # top-5 per token: logits - lse
                assert lb.keys() == lo.keys()
                np.testing.assert_allclose([lo[t] for t in lb], list(lb.values()),
                                           rtol=1e-5, atol=1e-5)
        cfg = tiny(name).cfg
        k_run = max(cfg.num_key_value_heads, tp)  # tp 4 > 2 KV heads: each head twice
        k_pages = llm.engine.runner.pool[0][0]
        assert k_pages.shape[2] == k_run and k_pages.sharding.spec == P(None, None, "tp", None)
        assert {s.data.shape[2] for s in k_pages.addressable_shards} == {k_run // tp}
        layer = llm.engine.runner.params["model"]["layers"][0]  # fused, one block per device
        assert "q_proj" not in layer["self_attn"] and "gate_proj" not in layer["mlp"]
        for w in (layer["self_attn"]["qkv_proj"]["weight"], layer["mlp"]["gate_up_proj"]["weight"]):
            assert w.shape[0] == tp and w.sharding.spec == P("tp", None, None)


@pytest.mark.parametrize("tp", [2, 4])
def test_report_is_what_one_device_holds(tp):
    """The startup report (the planner's arithmetic) equals the bytes device 0 actually holds;
    the pool gets tp x the blocks for the same per-device budget until KV heads run out."""
    model = tiny("tiny_qwen")
    budget = dict(kv_cache_memory_bytes=1 << 20, max_model_len=96)
    one = LLM(loaded=model, **budget).engine
    e = LLM(loaded=model, tensor_parallel_size=tp, **budget).engine
    held = _device0_bytes(e.runner.params)
    assert e.memory["bytes"]["weights"] == weights_bytes(model.cfg, "float32", tp) == held
    assert held < _device0_bytes(one.runner.params)
    assert e.memory["bytes"]["kv_pool"] == _device0_bytes(e.runner.pool)
    heads_per_device = max(1, model.cfg.num_key_value_heads // tp)
    assert e.spec.num_blocks == one.spec.num_blocks * model.cfg.num_key_value_heads \
        // heads_per_device


def test_bad_tp_says_what_to_change():
    model = tiny("tiny_qwen")  # 4 heads, 2 KV heads, 4 devices
    with pytest.raises(ValueError, match=r"must divide the number of attention heads \(4\): "
                                         r"use one of \[1, 2, 4\]"):
        LLM(loaded=model, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="needs 8 devices but JAX sees 4.*at most 4"):
        LLM(loaded=model, tensor_parallel_size=8)


def test_rules_table_collision_and_unknown_axis():
    assert sharding.logical_to_spec(("heads", "embed")) == P("tp", None)
    with pytest.raises(ValueError, match="both map to mesh axis 'tp'"):
        sharding.logical_to_spec(("vocab", "heads"))
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("experts",))
    with pytest.raises(ValueError, match="no logical axes for parameter model.rotary.inv_freq"):
        sharding.param_logical_axes({"model": {"rotary": {"inv_freq": np.zeros(4)}}})


def test_benchmark_passes_tensor_parallel_size():
    import argparse

    from benchmarks import harness, throughput

    p = argparse.ArgumentParser()
    throughput.add_arguments(p)
    args = p.parse_args(["--tiny", "--tensor-parallel-size", "2", "--distributed",
                         "--coordinator-address", "127.0.0.1:1234", "--num-processes", "2",
                         "--process-id", "1"])
    assert harness.engine_args(args).tensor_parallel_size == 2
    assert (args.distributed, args.num_processes, args.process_id) == (True, 2, 1)


def test_pallas_kernel_under_shard_map_matches_reference():
    """The Pallas GPU kernel (interpret mode on the CPU) run per device on its heads."""
    _, ref = run("tiny_qwen", 1)
    _, outs = generate_tp(tiny("tiny_qwen"), 2, attention_backend="pallas-gpu")
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in ref]


def test_tp_2_prompt_logprobs_and_penalties_equal_tp_1():
    """The sampler's optional inputs and outputs (penalties, prompt logprobs) under a mesh."""
    from pagedjax import SamplingParams
    from tests.scaleout.common import ENGINE, prompts

    model = tiny("tiny_qwen")
    sp = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=2, repetition_penalty=1.3,
                        presence_penalty=0.5, min_tokens=3)
    outs = [LLM(loaded=model, tensor_parallel_size=tp, **ENGINE).generate(
        prompts(model.cfg.vocab_size), sp, use_tqdm=False) for tp in (1, 2)]
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids)
        for da, db in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert da.keys() == db.keys()
            np.testing.assert_allclose([db[t] for t in da], list(da.values()), atol=1e-5)

"""``--kv-cache-dtype`` end to end on the tiny models: greedy decoding with each quantized cache
equals a one-shot recompute with the same quantization (through chunked prefill, decode steps,
preemption and the Pallas kernels in interpret mode); block copies (n > 1) and swaps move
quantized blocks bit-exact; the pool and the planner count the quantized bytes (fp8: 1 byte per
value, static scales in the model; int8: plus a scale per token and KV head; int4: half a byte per
value, V's scale per token, K's scale and zero point per channel of a block).
"""
from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.worker import kv_pool
from pagedjax.planning import memory_report as mr
from pagedjax.worker.attention import make_attend
from pagedjax.core.block_manager import BlockManager
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.kernels import QuantizedPages
from pagedjax.models import StepMeta, forward_paged
from pagedjax.worker.swap import HostKVPool
from pagedjax.core.swap_space import SwapSpace
from tests.conftest import assert_no_leak

QUANTIZED = ["fp8_e4m3", "fp8_e5m2", "int8", "int4"]
PER_TOKEN = ["fp8_e4m3", "fp8_e5m2", "int8"]  # a token's stored K/V depend on that token alone
ENGINE = dict(num_gpu_blocks_override=9, max_model_len=128, max_num_batched_tokens=32,
              max_num_seqs=4)  # 9 blocks cannot hold all four prompts: preemption happens
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
WIDTH = 128


def _prompts(seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 128, size=int(n)).tolist() for n in (1, 17, 40, 70)]


@functools.lru_cache(maxsize=None)
def _recompute(cfg, kv_dtype: str):
    """Logits of the last of ``n`` tokens, the whole sequence as one prefill chunk into a fresh
    pool of ``kv_dtype``, reference attention: the engine's arithmetic without its schedule."""
    spec = kv_pool.KVPoolSpec.for_model(cfg, WIDTH // 16, 16, kv_dtype)

    def last_logits(params, tokens, n):
        pos = jnp.arange(WIDTH, dtype=jnp.int32)
        meta = StepMeta(slot_mapping=jnp.where(pos < n, pos, -1),
                        block_tables=jnp.arange(spec.num_blocks, dtype=jnp.int32)[None],
                        context_lens=n[None], query_start_loc=jnp.stack([0 * n, n]))
        logits, _ = forward_paged(kv_pool.params_for_pool(spec, cfg, params), cfg, tokens, pos,
                                  kv_pool.allocate(spec), meta, make_attend("reference"),
                                  (n - 1)[None])
        return logits[0]

    return jax.jit(last_logits)


def greedy_recompute(model, prompt, max_tokens, kv_dtype):
    f = _recompute(model.cfg, kv_dtype)
    toks = list(prompt)
    for _ in range(max_tokens):
        padded = np.zeros(WIDTH, np.int32)
        padded[:len(toks)] = toks
        toks.append(int(jnp.argmax(f(model.params, padded, jnp.int32(len(toks))))))
    return toks[len(prompt):]


@pytest.mark.parametrize("kv_dtype", PER_TOKEN)
@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_greedy_equals_quantized_recompute(model, kv_dtype, request):
    model = request.getfixturevalue(model)
    llm = LLM(loaded=model, kv_cache_dtype=kv_dtype, attention_backend="reference", **ENGINE)
    k = llm.engine.runner.pool[0][0]
    assert k.dtype == kv_pool.storage_dtype(kv_dtype)
    assert isinstance(k, QuantizedPages) == (kv_dtype in ("int8", "int4"))  # fp8: plain pages
    attn = llm.engine.runner.params["model"]["layers"][0]["self_attn"]
    assert ("k_scale" in attn) == kv_dtype.startswith("fp8")
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    want = [greedy_recompute(model, p, GREEDY.max_tokens, kv_dtype) for p in _prompts()]
    assert got == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)


@functools.lru_cache(maxsize=None)
def _chunk_step(cfg, spec, chunk):
    def step(params, pool, tokens, start, n):  # tokens [chunk], the first n real
        pos = start + jnp.arange(chunk, dtype=jnp.int32)
        meta = StepMeta(slot_mapping=jnp.where(pos < start + n, pos, -1),
                        block_tables=jnp.arange(spec.num_blocks, dtype=jnp.int32)[None],
                        context_lens=(start + n)[None], query_start_loc=jnp.stack([0 * n, n]))
        logits, pool = forward_paged(params, cfg, tokens, pos, pool, meta,
                                     make_attend("reference"), (n - 1)[None])
        return logits[0], pool

    return jax.jit(step, donate_argnums=1)


def greedy_chunked(model, prompt, max_tokens, kv_dtype, chunk):
    """Greedy tokens with the prompt written into a fresh ``kv_dtype`` pool and attended
    ``chunk`` tokens a step from position 0, then one token a step: the engine's schedule for a
    lone sequence with a budget of ``chunk`` tokens, without the engine."""
    spec = kv_pool.KVPoolSpec.for_model(model.cfg, WIDTH // 16, 16, kv_dtype)
    step, pool = _chunk_step(model.cfg, spec, chunk), kv_pool.allocate(spec)
    toks, pos = list(prompt), 0
    while len(toks) < len(prompt) + max_tokens:
        n = min(chunk, len(toks) - pos)
        padded = np.zeros(chunk, np.int32)
        padded[:n] = toks[pos:pos + n]
        logits, pool = step(model.params, pool, padded, jnp.int32(pos), jnp.int32(n))
        pos += n
        if pos == len(toks):
            toks.append(int(jnp.argmax(logits)))
    return toks[len(prompt):]


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_int4_greedy_equals_token_by_token_reference(model, request):
    """int4's K parameters per channel of a block depend on the keys a step writes with the
    block's earlier ones, so the stored bits depend on the chunking. With a budget of one token
    a step the engine's tokens equal a reference that writes and attends one token at a time."""
    model = request.getfixturevalue(model)
    llm = LLM(loaded=model, kv_cache_dtype="int4", attention_backend="reference",
              **{**ENGINE, "max_num_batched_tokens": 1})
    k = llm.engine.runner.pool[0][0]
    assert isinstance(k, QuantizedPages) and k.data.dtype == jnp.uint8
    assert k.scale.shape == (9, 2, model.cfg.num_key_value_heads, model.cfg.head_dim)
    assert k.scale.dtype == jnp.float8_e4m3fn
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    want = [greedy_chunked(model, p, GREEDY.max_tokens, "int4", 1) for p in _prompts()]
    assert got == want
    assert_no_leak(llm)


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_int4_greedy_equals_chunked_reference(model, request):
    """Chunked prefill of 12 tokens a step (chunks that cut 16-token blocks, so blocks are
    written in parts and re-rounded), one sequence at a time: the engine's tokens equal a
    recompute that chunks the same way."""
    model = request.getfixturevalue(model)
    llm = LLM(loaded=model, kv_cache_dtype="int4", attention_backend="reference",
              **{**ENGINE, "max_num_batched_tokens": 12, "max_num_seqs": 1})
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    want = [greedy_chunked(model, p, GREEDY.max_tokens, "int4", 12) for p in _prompts()]
    assert got == want
    assert_no_leak(llm)


@pytest.mark.parametrize("backend,kv_dtype", [("pallas-gpu", "fp8_e4m3"), ("pallas-gpu", "int8"),
                                              ("pallas-tpu", "fp8_e5m2"), ("pallas-gpu", "int4"),
                                              ("pallas-tpu", "int4")])
def test_pallas_backends_match_the_reference(tiny_llama, backend, kv_dtype):
    if kv_dtype == "int4" and backend == "pallas-gpu":  # the GPU kernels' int4 needs H >= 32
        from tests.conftest import TinyModel, random_params

        cfg = dataclasses.replace(tiny_llama.cfg, head_dim=32)
        tiny_llama = TinyModel(cfg, random_params(cfg, seed=1))
    ref = LLM(loaded=tiny_llama, kv_cache_dtype=kv_dtype, attention_backend="reference", **ENGINE)
    pal = LLM(loaded=tiny_llama, kv_cache_dtype=kv_dtype, attention_backend=backend, **ENGINE)
    want = [o.outputs[0].token_ids for o in ref.generate(_prompts(), GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in pal.generate(_prompts(), GREEDY, use_tqdm=False)]
    assert got == want
    assert pal.engine.scheduler.num_preemptions > 0
    assert_no_leak(pal)


def test_quantization_changes_the_cache_not_the_engine(tiny_qwen):
    """Same prompts, auto vs int8: most greedy tokens agree (int8 is close), and the int8 pool
    holds int8 values, not a float pool under another name."""
    auto = LLM(loaded=tiny_qwen, attention_backend="reference", **ENGINE)
    int8 = LLM(loaded=tiny_qwen, kv_cache_dtype="int8", attention_backend="reference", **ENGINE)
    a = [o.outputs[0].token_ids for o in auto.generate(_prompts(), GREEDY, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in int8.generate(_prompts(), GREEDY, use_tqdm=False)]
    same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert same >= 0.75 * sum(map(len, a)), (a, b)
    k = int8.engine.runner.pool[0][0]
    assert k.data.dtype == jnp.int8 and k.scale.dtype == jnp.bfloat16
    assert np.abs(np.asarray(k.data)).max() == 127, "some row's absmax maps to 127"


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8", "int4"])
def test_n_samples_copy_quantized_blocks_bit_exact(tiny_qwen, kv_dtype):
    """n = 3 children of a 100-token prompt fork inside its last, partial block: copy-on-write
    copies that block (values and scales). Each child equals a lone run with its seed only if
    the copy is exact."""
    llm = LLM(loaded=tiny_qwen, kv_cache_dtype=kv_dtype, num_gpu_blocks_override=60,
              max_model_len=256)
    prompt = np.random.default_rng(1).integers(2, 128, size=100).tolist()
    sp = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    copies = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        batch = schedule()
        copies.extend(batch.copies)
        return batch

    llm.engine.scheduler.schedule = spy
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    llm.engine.scheduler.schedule = schedule
    assert copies, "the fork was meant to copy the partial block"
    for o in out.outputs:
        lone = SamplingParams(temperature=0.8, seed=11 + o.index, max_tokens=10, ignore_eos=True)
        assert llm.generate([prompt], lone, use_tqdm=False)[0].outputs[0].token_ids == o.token_ids
    assert_no_leak(llm)


def _random_quantized_pool(spec, seed=0):
    """Every bit pattern, NaN payloads included, in values and (int8, int4) scales."""
    pool = kv_pool.allocate(spec)
    leaves, tree = jax.tree.flatten(pool)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def bits(key, x):
        raw = jax.random.bits(key, x.shape, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        return jax.lax.bitcast_convert_type(raw, x.dtype)

    return jax.tree.unflatten(tree, [bits(k, x) for k, x in zip(keys, leaves)])


def _bits(pool):
    return [np.asarray(kv_pool._bits(x)) for x in jax.tree.leaves(pool)]


@pytest.mark.parametrize("kv_dtype", QUANTIZED)
def test_copy_blocks_bit_exact(kv_dtype):
    spec = kv_pool.KVPoolSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2,
                              head_dim=8, dtype=kv_dtype)
    pool = _random_quantized_pool(spec)
    before = _bits(pool)
    src, dst = jnp.array([1, 6, 0, 0], jnp.int32), jnp.array([3, 2, -1, -1], jnp.int32)
    after = _bits(jax.jit(kv_pool.copy_blocks)(pool, src, dst))
    for x, y in zip(before, after):
        want = x.copy()
        want[[3, 2]] = x[[1, 6]]
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("kv_dtype", QUANTIZED)
def test_swapped_quantized_blocks_round_trip_bit_exact(kv_dtype):
    """Out to host pieces and back into other blocks: values and scales, every bit."""
    spec = kv_pool.KVPoolSpec(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2,
                              head_dim=8, dtype=kv_dtype)
    runner = types.SimpleNamespace(pool=_random_quantized_pool(spec, seed=1))
    before = _bits(runner.pool)
    bm, space = BlockManager(16, 4), SwapSpace(num_pieces=5, piece_blocks=2, block_size=4)
    host = HostKVPool(spec, space, runner)
    # a piece holds 2 blocks of values and scales: the host bytes are the pool's bytes per block
    assert host.piece_bytes == 2 * spec.bytes_per_block
    bm.append_slots(0, 0, 4 * 5)
    table0 = list(bm.table(0))
    host.execute(types.SimpleNamespace(swap_out=space.swap_out(bm, 0), swap_in=[], offload_out=[],
                                       offload_in=[]), runner)
    bm.append_slots(2, 0, 4 * 11)  # every other block taken and overwritten
    runner.pool = jax.jit(lambda pool: jax.tree.map(jnp.zeros_like, pool), donate_argnums=0,
                          out_shardings=jax.tree.map(lambda x: x.sharding, runner.pool))(
        runner.pool)
    bm.free(2)
    bm.append_slots(3, 0, 4 * 3)
    host.execute(types.SimpleNamespace(swap_out=[], swap_in=space.swap_in(bm, 0), offload_out=[],
                                       offload_in=[]), runner)
    host.wait()
    assert sorted(bm.table(0)) != sorted(table0)
    after = _bits(runner.pool)
    for b_old, b_new in zip(table0, bm.table(0)):
        for x, y in zip(before, after):
            np.testing.assert_array_equal(x[b_old], y[b_new])


def test_swap_preemption_with_a_quantized_pool(tiny_qwen):
    """Swap-preempted sequences resume with exactly the tokens of an unpreempted run. Not int4:
    the two runs chunk the prompts differently, which int4's block parameters see
    (test_int4_greedy_equals_chunked_reference); its swaps are bit-exact above."""
    kw = dict(kv_cache_dtype="int8", block_size=16, max_model_len=256, max_num_batched_tokens=64,
              max_num_seqs=6, attention_backend="reference")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=int(k)).tolist() for k in rng.integers(40, 81, size=6)]
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    roomy = LLM(loaded=tiny_qwen, num_gpu_blocks_override=64, **kw)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, sp, use_tqdm=False)]
    assert roomy.engine.scheduler.num_preemptions == 0
    tight = LLM(loaded=tiny_qwen, num_gpu_blocks_override=16, preemption_mode="swap",
                num_cpu_blocks_override=64, **kw)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, sp, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions_swap > 0
    assert got == want
    assert_no_leak(tight)


# ---- sizes: pool, planner, flag ----------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", QUANTIZED)
def test_pool_bytes_are_what_is_allocated(tiny_qwen, kv_dtype):
    llm = LLM(loaded=tiny_qwen, kv_cache_dtype=kv_dtype, kv_cache_memory_bytes=1 << 20,
              max_model_len=256)
    spec = llm.engine.spec
    assert spec.dtype == kv_dtype and spec.quantized
    allocated = sum(x.nbytes for x in jax.tree.leaves(llm.engine.runner.pool))
    assert allocated == spec.total_bytes <= 1 << 20
    auto = LLM(loaded=tiny_qwen, kv_cache_memory_bytes=1 << 20, max_model_len=256).engine.spec
    # float32 tiny model, head_dim 16: 64 bytes per token and head vs 16 (fp8) or 16 + 2 (int8);
    # int4 (K and V averaged): 8 values + 1 (V's scale) + 1 (K's 16 channel scales per 16 tokens)
    per_token = {"int8": 18, "int4": 10}.get(kv_dtype, 16)
    assert spec.num_tokens / auto.num_tokens == pytest.approx(64 / per_token, rel=0.02)


def test_planner_bytes_per_token_fp8_is_half_of_bf16_int8_adds_scales():
    from pagedjax.planning.model_source import resolve_model

    cfg = resolve_model("Qwen2.5-7B-Instruct").cfg  # 28 layers, 4 KV heads, head_dim 128

    def config(kv_dtype="auto", dtype="bfloat16"):
        return EngineConfig.resolve(EngineArgs(kv_cache_dtype=kv_dtype, max_model_len=4096,
                                               kv_cache_memory_bytes=10 << 30), cfg, dtype)

    def per_token(kv_dtype):
        return mr.plan_pool(config(kv_dtype)).bytes_per_token

    bf16 = per_token("auto")
    assert bf16 == 57_344
    scales = 2 * 28 * 4 * 2  # K and V, per layer and KV head, one bf16 each
    assert per_token("fp8_e4m3") == per_token("fp8_e5m2") == per_token("fp8") == bf16 // 2 \
        == 28_672
    assert per_token("int8") == bf16 // 2 + scales == 29_120
    base = mr.memory_report(config())
    for kv_dtype, want in (("fp8_e4m3", 28_672), ("int8", 29_120)):
        rep = mr.memory_report(config(kv_dtype))
        assert rep["kv_dtype"] == kv_dtype and rep["kv_bytes_per_token"] == want
        assert rep["block_bytes"] == 16 * want
        assert rep["num_tokens"] / base["num_tokens"] == pytest.approx(bf16 / want, abs=2e-3)
    assert config("fp8").kv_dtype == "fp8_e4m3"
    assert config("auto", "float16").kv_dtype == "float16"


def test_int4_pool_holds_3_5x_bf16_tokens():
    """Issue 22's line, on the KVPoolSpec arithmetic (scales included) at block size 16, for
    Qwen2.5-7B (28 layers, 4 KV heads, head_dim 128) and Llama-2-7B (32 layers, 32 KV heads,
    head_dim 128) shapes; the engine, the planner and memory_report all size the pool by it."""
    budget = 20 << 30
    for layers, kv_heads in ((28, 4), (32, 32)):
        def spec(dtype):
            return kv_pool.KVPoolSpec(layers, 0, 16, kv_heads, 128, dtype)

        int4, bf16 = spec("int4"), spec("bfloat16")
        # per KV head and layer, a block: 16 x (64 + 64) bytes of codes, 16 V scales, 128 K scales
        assert int4.bytes_per_block == layers * kv_heads * (16 * 128 + 2 * 16 + 2 * 128)
        assert int4.bytes_per_token == layers * kv_heads * 146
        ratio = (budget // int4.bytes_per_block) / (budget // bf16.bytes_per_block)
        assert ratio >= 3.5, (layers, kv_heads, ratio)


def test_planner_and_memory_report_know_int4(capsys):
    import json

    from pagedjax.entrypoints import cli
    from pagedjax.planning.model_source import resolve_model

    cfg = resolve_model("Qwen2.5-7B-Instruct").cfg

    def config(kv_dtype):
        return EngineConfig.resolve(EngineArgs(kv_cache_dtype=kv_dtype, max_model_len=4096,
                                               kv_cache_memory_bytes=10 << 30), cfg, "bfloat16")

    rep, base = mr.memory_report(config("int4")), mr.memory_report(config("auto"))
    assert rep["kv_dtype"] == "int4" and rep["kv_bytes_per_token"] == 28 * 4 * 146 == 16_352
    assert rep["block_bytes"] == 16 * 16_352
    assert rep["num_tokens"] / base["num_tokens"] == pytest.approx(57_344 / 16_352, abs=2e-3)
    assert rep["max_concurrency"] >= 3 * base["max_concurrency"]
    assert cli.main(["plan", "--model", "Qwen2.5-7B-Instruct", "--kv-cache-dtype", "int4",
                     "--gpu-memory", "80GiB", "--json"]) is None
    r = json.loads(capsys.readouterr().out)
    assert r["kv_cache_dtype"] == "int4" and r["kv_bytes_per_token"] == 16_352
    assert r["block_bytes"] == 16 * 16_352
    assert r["memory"]["num_tokens"] == r["memory"]["num_blocks"] * 16 > 0
    assert any("KV cache int4" in n and "146 B" in n for n in r["notes"]), r["notes"]
    with pytest.raises(ValueError, match="even head_dim"):
        EngineConfig.resolve(EngineArgs(kv_cache_dtype="int4"),
                             dataclasses.replace(cfg, head_dim=127), "bfloat16")


def test_bad_kv_cache_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"--kv-cache-dtype 'fp4'.*'fp8_e4m3', 'fp8_e5m2', 'int8'"):
        EngineArgs(kv_cache_dtype="fp4")


def test_cli_flag_reaches_the_engine_args():
    import argparse

    from pagedjax.config import add_engine_arguments

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert EngineArgs.from_namespace(p.parse_args(["--kv-cache-dtype", "int8"])).kv_cache_dtype \
        == "int8"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "fp4"])


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "int4"])
def test_tensor_parallel_splits_values_and_scales_by_kv_head(kv_dtype):
    """tp 2 on fake CPU devices: the 1-byte values and int8's per-token scales are split by KV
    head like bf16 pages, fp8's static scales by KV head like k_proj, and the tokens equal tp 1's."""
    from tests.scaleout.common import generate_tp, tiny

    _, one = generate_tp(tiny("tiny_qwen"), 1, kv_cache_dtype=kv_dtype)
    llm, two = generate_tp(tiny("tiny_qwen"), 2, kv_cache_dtype=kv_dtype)
    assert [o["token_ids"] for o in two] == [o["token_ids"] for o in one]
    k = llm.engine.runner.pool[0][0]
    arrays = [k.data, k.scale] if kv_dtype in ("int8", "int4") else [
        k, llm.engine.runner.params["model"]["layers"][0]["self_attn"]["k_scale"]]
    for x in arrays:
        assert x.sharding.spec[2 if x.ndim == 4 else 0] == "tp"
        assert {s.data.shape[2 if x.ndim == 4 else 0] for s in x.addressable_shards} == {1}

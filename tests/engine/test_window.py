"""``--kv-sink-tokens S --kv-window W`` end to end on the tiny models: greedy tokens equal a full
recompute with the same mask (prompts longer than S + W, so the window slides through chunked
prefill, decode steps and preemption), a long generation holds a bounded number of blocks, and
prefix caching, n > 1 and swap preemption keep working with released blocks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.core.block_manager import RELEASED
from pagedjax.models import StepMeta, forward_paged
from pagedjax.worker import kv_pool
from pagedjax.worker.attention import make_attend
from tests.conftest import TINY_QWEN, assert_no_leak, greedy_reference

SINK, WINDOW, BS = 4, 16, 8
MASK = dict(kv_sink_tokens=SINK, kv_window=WINDOW, block_size=BS)
ENGINE = dict(num_gpu_blocks_override=14, max_model_len=256, max_num_batched_tokens=24,
              max_num_seqs=4, attention_backend="reference", **MASK)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
WIDTH = 128


def _prompts(seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 128, size=int(n)).tolist() for n in (1, 19, 45, 70)]


def bound(n_chunk: int = 1) -> int:
    """Blocks a sequence holds at most: its sinks, its window and the step's chunk."""
    return -(-SINK // BS) + -(-(WINDOW + n_chunk - 1) // BS) + 1


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_greedy_equals_masked_recompute(model, request):
    model = request.getfixturevalue(model)
    llm = LLM(loaded=model, **ENGINE)
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    want = [greedy_reference(model, p, GREEDY.max_tokens, sink_tokens=SINK, window=WINDOW)
            for p in _prompts()]
    assert got == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)
    # the mask matters: full attention gives other tokens for these prompts
    assert want != [greedy_reference(model, p, GREEDY.max_tokens, window=0) for p in _prompts()]


@functools.lru_cache(maxsize=None)
def _recompute(cfg, kv_dtype: str):
    """Logits of the last of ``n`` tokens, the whole sequence one prefill chunk into a fresh
    ``kv_dtype`` pool, reference attention with the mask: the engine's arithmetic, no schedule."""
    spec = kv_pool.KVPoolSpec.for_model(cfg, WIDTH // BS, BS, kv_dtype)

    def last_logits(params, tokens, n):
        pos = jnp.arange(WIDTH, dtype=jnp.int32)
        meta = StepMeta(slot_mapping=jnp.where(pos < n, pos, -1),
                        block_tables=jnp.arange(spec.num_blocks, dtype=jnp.int32)[None],
                        context_lens=n[None], query_start_loc=jnp.stack([0 * n, n]))
        attend = make_attend("reference", sink_tokens=SINK, window=WINDOW)
        logits, _ = forward_paged(kv_pool.params_for_pool(spec, cfg, params), cfg, tokens, pos,
                                  kv_pool.allocate(spec), meta, attend, (n - 1)[None])
        return logits[0]

    return jax.jit(last_logits)


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_int8_greedy_equals_masked_quantized_recompute(model, request):
    model = request.getfixturevalue(model)
    llm = LLM(loaded=model, kv_cache_dtype="int8", **ENGINE)
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    f = _recompute(model.cfg, "int8")
    for prompt, tokens in zip(_prompts(), got):
        toks = list(prompt)
        for _ in range(GREEDY.max_tokens):
            padded = np.zeros(WIDTH, np.int32)
            padded[:len(toks)] = toks
            toks.append(int(jnp.argmax(f(model.params, padded, jnp.int32(len(toks))))))
        assert tokens == toks[len(prompt):]
    assert_no_leak(llm)


def test_pallas_kernels_in_the_engine_match_the_reference(tiny_llama):
    """The GPU kernels (interpret mode) behind the engine give the reference backend's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = _prompts()[1:3]
    want = [o.outputs[0].token_ids for o in LLM(loaded=tiny_llama, **ENGINE).generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(loaded=tiny_llama, **{**ENGINE, "attention_backend": "pallas-gpu"})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want


def test_long_generation_holds_bounded_blocks(tiny_qwen):
    """300 tokens through one sequence: after every step it holds at most
    ceil(S / bs) + ceil(W / bs) + 1 blocks, and the pool's usage stays flat."""
    llm = LLM(loaded=tiny_qwen, **{**ENGINE, "max_num_batched_tokens": 8, "max_model_len": 400})
    eng, bm = llm.engine, llm.engine.block_manager
    held = []

    def observe(engine):
        for table in bm.tables.values():
            held.append(sum(b != RELEASED for b in table))
        assert bm.num_blocks - bm.num_free <= bound(8)

    eng.step_observers.append(observe)
    out = llm.generate([[5] * 30], SamplingParams(temperature=0.0, max_tokens=300,
                                                  ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 300
    assert max(held[-250:]) <= -(-SINK // BS) + -(-WINDOW // BS) + 1
    assert_no_leak(llm)


def test_prefix_caching_n_samples_and_swap_with_a_window(tiny_qwen):
    """Released blocks are not cached, copied or swapped: a repeated prompt (prefix hit), n = 2
    greedy samples and swap preemption all give the masked reference's tokens."""
    prompts = _prompts(seed=9)
    want = [greedy_reference(tiny_qwen, p, GREEDY.max_tokens, sink_tokens=SINK, window=WINDOW)
            for p in prompts]
    llm = LLM(loaded=tiny_qwen, enable_prefix_caching=True, **ENGINE)
    for _ in range(2):  # the second round hits the blocks the first one cached
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert got == want
    assert llm.engine.block_manager.hits > 0
    assert_no_leak(llm)
    n2 = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, ignore_eos=True, n=2)
    out = llm.generate(prompts[2:3], n2, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [want[2]] * 2
    assert_no_leak(llm)
    llm = LLM(loaded=tiny_qwen, preemption_mode="swap", num_cpu_blocks_override=64, **ENGINE)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    assert llm.engine.scheduler.num_preemptions_swap > 0
    assert_no_leak(llm)
    assert llm.engine.swap_space.bm.num_free == llm.engine.swap_space.num_pieces


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_sink_tokens=4), "needs a window"),
    (dict(kv_window=4), "at least --block-size"),
    (dict(kv_window=-1), ">= 0"),
])
def test_bad_window_flags_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kwargs)


def test_model_sliding_window_is_the_engine_window():
    """A config that declares a sliding window gives the engine that window with no sinks; a
    Qwen2 config with use_sliding_window false, or windows on only some layers, does not."""
    from pagedjax.models import ModelConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    mistral = ModelConfig.from_hf({**base, "model_type": "mistral", "sliding_window": 32})
    assert mistral.sliding_window == 32
    assert ModelConfig.from_hf({**base, "model_type": "mistral",
                                "sliding_window": None}).sliding_window is None
    qwen = {**base, "model_type": "qwen2", "sliding_window": 32, "max_window_layers": 0}
    assert ModelConfig.from_hf(qwen).sliding_window is None  # use_sliding_window defaults off
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True}).sliding_window == 32
    with pytest.raises(ValueError, match="1 of 2 layers"):
        ModelConfig.from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1})
    config = EngineConfig.resolve(EngineArgs(block_size=8), mistral, "float32")
    assert (config.sink_tokens, config.window) == (0, 32)
    with pytest.raises(ValueError, match="drop both flags"):
        EngineConfig.resolve(EngineArgs(block_size=8, kv_window=16), mistral, "float32")
    config = EngineConfig.resolve(EngineArgs(**MASK), TINY_QWEN, "float32")
    assert (config.sink_tokens, config.window) == (SINK, WINDOW)


def test_sliding_window_model_equals_transformers_mask(tiny_qwen):
    """A model whose config declares a window runs the engine with it: its tokens equal the
    dense recompute with that window (forward_dense reads the config's)."""
    import dataclasses

    from tests.conftest import TinyModel

    model = TinyModel(dataclasses.replace(tiny_qwen.cfg, sliding_window=WINDOW), tiny_qwen.params)
    llm = LLM(loaded=model, **{k: v for k, v in ENGINE.items() if not k.startswith("kv_")})
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    assert got == [greedy_reference(model, p, GREEDY.max_tokens) for p in _prompts()]
    assert_no_leak(llm)


def test_planner_and_memory_report_bound_a_windowed_sequence(capsys):
    """With a window, a sequence's blocks stop growing: at a max_model_len far past the window
    the pool holds many more sequences than with full attention (int4 as well)."""
    import json

    from pagedjax.entrypoints import cli
    from pagedjax.planning import memory_report as mr
    from pagedjax.planning.model_source import resolve_model

    cfg = resolve_model("Qwen2.5-7B-Instruct").cfg

    def report(**kw):
        return mr.memory_report(EngineConfig.resolve(
            EngineArgs(max_model_len=32768, kv_cache_memory_bytes=10 << 30, **kw), cfg,
            "bfloat16"))

    full, win = report(), report(kv_sink_tokens=16, kv_window=4096)
    assert win["num_blocks"] == full["num_blocks"]  # same pool, fewer blocks a sequence
    assert win["blocks_per_seq"] == 1 + 4096 // 16 + 1 < full["blocks_per_seq"] == 2048
    assert win["max_concurrency"] == win["num_blocks"] // 258
    assert win["max_concurrency"] >= 7 * full["max_concurrency"]
    assert report(kv_cache_dtype="int4", kv_window=4096)["max_concurrency"] > \
        3 * win["max_concurrency"]
    assert cli.main(["plan", "--model", "Qwen2.5-7B-Instruct", "--kv-window", "4096",
                     "--kv-sink-tokens", "16", "--max-model-len", "32768", "--gpu-memory",
                     "80GiB", "--json"]) is None
    r = json.loads(capsys.readouterr().out)
    assert (r["kv_sink_tokens"], r["kv_window"]) == (16, 4096)
    row = next(c for c in r["concurrency"] if c["max_model_len"] == 32768)
    assert row["blocks_per_seq"] == 258 and row["kv_bytes_per_seq"] == 258 * r["block_bytes"]
    assert row["max_concurrency"] == r["memory"]["num_blocks"] // 258
    assert any("KV window" in n for n in r["notes"]), r["notes"]


def test_engine_refuses_a_pool_smaller_than_one_window():
    """The start-up check counts the sinks, the window and a step's chunk."""
    from pagedjax.worker import kv_pool as kp

    spec = kp.KVPoolSpec.for_model(TINY_QWEN, 5, BS, "float32", SINK, WINDOW)
    kp.check_fits(spec, 1 << 20)  # 1 + 2 + 1 blocks: a million-token sequence fits
    with pytest.raises(ValueError, match="lower --max-num-batched-tokens"):
        kp.check_fits(spec, 1 << 20, chunk=24)

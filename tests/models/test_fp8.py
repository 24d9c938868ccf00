"""FP8 weights (``--quantization fp8``, pagedjax/models/fp8.py): the linear's every path against a
numpy reference of the same quantisation, the path chosen by the step's rows, the engine's greedy
tokens against transformers with the same quantisation applied (W8A8 and W8A16), dummy weights, the
weight-bytes accounting and the flag's validation."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tests.conftest import TINY_QWEN, TinyModel, greedy_reference, random_params
from tests.models.loader_testutil import make_torch_model

from pagedjax import LLM, SamplingParams
from pagedjax.config import EngineArgs, EngineConfig, add_engine_arguments
from pagedjax.models import dummy, fp8, load_model
from pagedjax.models.fused import fuse_projections
from pagedjax.planning.memory_report import memory_report, weights_bytes

GREEDY = dict(temperature=0.0, ignore_eos=True)


def quantize_ref(x: np.ndarray):
    """numpy: per-row amax / 448 scales and the e4m3 values, as float64."""
    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float64)
    scale = np.where(amax > 0, amax / 448.0, 1.0)
    q = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q, scale


def fp8_linear_ref(x: np.ndarray, w: np.ndarray, activations: bool = True) -> np.ndarray:
    """x [T, D] by w [O, D], w quantised per row and (W8A8, ``activations``) x too, in
    float64."""
    xq, sx = quantize_ref(x) if activations else (x.astype(np.float64), 1.0)
    wq, sw = quantize_ref(w)
    return (xq @ wq.T) * sx * sw.T


@pytest.fixture
def pin_paths(monkeypatch):
    """pin_paths(n): every fp8 linear of at most n rows runs W8A16, every larger one W8A8 (0: all
    W8A8, a huge number: all W8A16), so a reference knows what was quantised. The path is baked
    in at trace time: compiled programs are dropped on the way in and out."""
    def pin(small_t_max: int) -> None:
        monkeypatch.setattr(fp8, "SMALL_T_MAX", small_t_max)
        jax.clear_caches()

    yield pin
    monkeypatch.undo()
    jax.clear_caches()


ALL_W8A8, ALL_W8A16 = 0, 1 << 30


@pytest.mark.parametrize("path", fp8.PATHS)
@pytest.mark.parametrize("shape", [(7, 64, 96), (1, 128, 32), (33, 48, 200)])
def test_fp8_linear_matches_numpy_reference(shape, path):
    t, d, o = shape
    rng = np.random.default_rng(t)
    # a spread of magnitudes across tokens and channels, as real activations have
    x = (rng.standard_normal((t, d)) * rng.lognormal(0, 2, (t, 1))).astype(np.float32)
    w = (rng.standard_normal((o, d)) * rng.lognormal(-3, 1, (o, 1))).astype(np.float32)
    wq, ws = fp8.quantize_weight(jnp.asarray(w))
    assert wq.dtype == jnp.float8_e4m3fn and ws.shape == (o,) and ws.dtype == jnp.float32
    y = np.asarray(jax.jit(fp8.fp8_linear, static_argnames="path")(
        jnp.asarray(x), wq, ws, path=path))
    ref = fp8_linear_ref(x, w, activations=path.startswith("w8a8"))
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < 1e-3, err
    # and the quantisation is real: against the float product the error is ~1e-2
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(y - exact).max() / np.abs(exact).max() > 3e-3


def test_the_path_follows_the_rows_of_the_step(monkeypatch):
    """Up to SMALL_T_MAX rows the small-step path, above it the large-step one; fp8_linear
    without a path gives exactly the chosen path's numbers."""
    monkeypatch.setattr(fp8, "SMALL_T_MAX", 8)
    monkeypatch.setattr(fp8, "SMALL_T_PATH", "w8a16")
    monkeypatch.setattr(fp8, "LARGE_T_PATH", "w8a8_out")
    assert [fp8.choose_path(t) for t in (1, 8, 9)] == ["w8a16", "w8a16", "w8a8_out"]
    rng = np.random.default_rng(11)
    w = jnp.asarray(rng.standard_normal((24, 32)), jnp.float32)
    wq, ws = fp8.quantize_weight(w)
    for t, path in ((8, "w8a16"), (9, "w8a8_out")):
        x = jnp.asarray(rng.standard_normal((t, 32)), jnp.bfloat16)
        np.testing.assert_array_equal(fp8.fp8_linear(x, wq, ws),
                                      fp8.fp8_linear(x, wq, ws, path=path))
    with pytest.raises(ValueError, match="path 'int8' is not one of"):
        fp8.fp8_linear(x, wq, ws, path="int8")


def test_bf16_output_of_the_gemm_costs_one_rounding():
    """w8a8_out with bf16 activations: the dot's output is rounded to bf16 before the scales, so
    it is within two bf16 roundings of the float32-output form."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((40, 64)), jnp.bfloat16)
    wq, ws = fp8.quantize_weight(jnp.asarray(rng.standard_normal((48, 64)) * 0.02, jnp.float32))
    a = np.asarray(fp8.fp8_linear(x, wq, ws, path="w8a8"), np.float32)
    b = np.asarray(fp8.fp8_linear(x, wq, ws, path="w8a8_out"), np.float32)
    np.testing.assert_allclose(b, a, rtol=2 ** -7, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("path", ["w8a8", "w8a16"])
def test_fused_weight_and_leading_dims(path):
    """A fused [R, O, D] weight and [B, T, D] activations give the [B, T, R, O] slices of the
    same product, row by row."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    w = rng.standard_normal((3, 16, 32)).astype(np.float32)
    wq, ws = fp8.quantize_weight(jnp.asarray(w))
    assert ws.shape == (3, 16)
    y = np.asarray(fp8.fp8_linear(jnp.asarray(x), wq, ws, path=path))
    ref = fp8_linear_ref(x.reshape(10, 32), w.reshape(48, 32), path == "w8a8")
    ref = ref.reshape(2, 5, 3, 16)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-3


@pytest.mark.parametrize("path", ["w8a8", "w8a8_out", "w8a16"])
def test_zero_rows_and_large_values_stay_finite(path):
    x = jnp.zeros((3, 16)).at[1].set(1e6).at[2, 0].set(-3e4)
    w = jnp.ones((4, 16)).at[0].set(0.0)
    y = fp8.fp8_linear(x, *fp8.quantize_weight(w), path=path)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(y[0], 0.0)
    np.testing.assert_allclose(y[:, 0], 0.0)
    np.testing.assert_allclose(y[1, 1:], 16e6, rtol=1e-6)
    np.testing.assert_allclose(y[2, 1:], -3e4, rtol=1e-6)


def torch_fake_quant_reference(model, weights: dict | None = None, activations: bool = True):
    """transformers' model with every linear but lm_head computing in the fp8 arithmetic:
    weights replaced by their e4m3 round trip (or by ``weights[module name]``, dequantised
    fp8), inputs rounded per token by a pre-hook (W8A8; ``activations`` False: W8A16)."""
    import torch

    def round_trip(x):  # per-row amax / 448, as pagedjax/models/fp8.py
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(round_trip(mod.weight) if weights is None else weights[name])
                if activations:
                    mod.register_forward_pre_hook(lambda m, args: (round_trip(args[0]),))
    return model


def _torch_greedy(model, prompt, n):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("family, regime", [("qwen2", "w8a8"), ("llama", "w8a8"),
                                             ("qwen2", "w8a16"), ("llama", "w8a16")])
def test_engine_greedy_matches_transformers_with_the_same_quantisation(family, regime, tmp_path,
                                                                        pin_paths):
    """A bf16-style checkpoint loaded with --quantization fp8 through the whole engine (fused
    projections, paged attention, chunked prefill) generates transformers' greedy tokens when
    transformers applies the same rounding: of the weights and (W8A8, every step pinned to it)
    of each linear's input per token, or of the weights only (W8A16, every step pinned to it:
    what decode-sized steps run)."""
    pin_paths(ALL_W8A8 if regime == "w8a8" else ALL_W8A16)
    model = make_torch_model(family, seed=3)
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 17, 40)]
    llm = LLM(model=str(tmp_path), dtype="float32", quantization="fp8",
              num_gpu_blocks_override=32, max_model_len=128, max_num_batched_tokens=32)
    layer = llm.engine.runner.params["model"]["layers"][0]
    assert layer["mlp"]["gate_up_proj"]["weight"].dtype == jnp.float8_e4m3fn
    assert layer["self_attn"]["qkv_proj"]["weight_scale"].dtype == jnp.float32
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    ref = torch_fake_quant_reference(model, activations=regime == "w8a8")
    plain = load_model(str(tmp_path), dtype="float32")
    differs = False
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _torch_greedy(ref, p, 8), f"prompt of {len(p)}"
        differs |= o.outputs[0].token_ids != greedy_reference(plain, p, 8)
    assert differs, "fp8 generated exactly the float32 tokens: is anything quantised?"


def test_loaded_params_are_quantised_in_the_engine_and_match_the_dense_path(tiny_qwen,
                                                                            pin_paths):
    """LLM(loaded=float params, quantization="fp8"): the engine quantises its own copy (the
    caller's tree stays float) and its paged path gives the dense fp8 model's greedy tokens
    (both W8A16: the reference pads to 512 rows, the engine's steps are small)."""
    pin_paths(ALL_W8A16)
    llm = LLM(loaded=tiny_qwen, quantization="fp8", num_gpu_blocks_override=40,
              max_model_len=256, max_num_batched_tokens=32)
    assert tiny_qwen.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"].dtype == jnp.float32
    q = TinyModel(tiny_qwen.cfg, fp8.quantize_params(tiny_qwen.params))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (1, 17, 45)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_reference(q, p, 8)


def test_fusing_quantised_projections_keeps_the_model():
    """Per-channel scales fuse with their rows: the fused fp8 model is the unfused one (up to
    float32 summation order: the fused and unfused programs compile differently)."""
    params = fp8.quantize_params(random_params(TINY_QWEN, seed=2))
    fused = fuse_projections(TINY_QWEN, params, 1)
    assert fused["model"]["layers"][0]["self_attn"]["qkv_proj"]["weight_scale"].shape == (1, 128)
    from pagedjax.models import forward_dense

    dense = jax.jit(forward_dense, static_argnums=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 20)), jnp.int32)
    np.testing.assert_allclose(dense(params, TINY_QWEN, tokens), dense(fused, TINY_QWEN, tokens),
                               rtol=1e-4, atol=1e-4)


def test_dummy_fp8_weights_and_abstract_params_agree():
    cfg = TINY_QWEN
    params = dummy.dummy_params(cfg, "bfloat16", 0, "fp8")
    abstract = dummy.abstract_params(cfg, "bfloat16", "fp8")
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    assert got == want
    layer = params["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["weight"].dtype == jnp.float8_e4m3fn
    assert layer["self_attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
    assert params["lm_head"]["weight"].dtype == jnp.bfloat16  # fp8.QUANTIZE_LM_HEAD is off
    # the scales are those of the same random draw quantised: w ~ N(0, 0.02) rows of 64
    s = np.asarray(layer["mlp"]["down_proj"]["weight_scale"])
    assert ((s > 0.02 * 1.5 / 448) & (s < 0.02 * 6 / 448)).all()


@pytest.mark.parametrize("tp", [1, 2])
def test_weight_bytes_are_what_the_fp8_params_hold(tp):
    """memory_report's weights at fp8 equal the bytes of the fp8 tree (every leaf, scales
    included), and the KV pool grows by the bytes fp8 frees, to within a block."""
    cfg = TINY_QWEN
    held = sum(x.nbytes for x in jax.tree.leaves(dummy.dummy_params(cfg, "bfloat16", 0, "fp8")))
    assert weights_bytes(cfg, "bfloat16", 1, "fp8") == held
    bf16 = weights_bytes(cfg, "bfloat16", tp)
    ours = weights_bytes(cfg, "bfloat16", tp, "fp8")
    assert ours < bf16
    total = 2 << 30
    reps = {q: memory_report(EngineConfig.resolve(EngineArgs(quantization=q), cfg, "bfloat16"),
                             total_bytes=total) for q in (None, "fp8")}
    freed = reps[None]["bytes"]["weights"] - reps["fp8"]["bytes"]["weights"]
    assert freed == weights_bytes(cfg, "bfloat16") - weights_bytes(cfg, "bfloat16", 1, "fp8")
    grown = reps["fp8"]["bytes"]["kv_pool"] - reps[None]["bytes"]["kv_pool"]
    assert 0 <= freed - grown < reps["fp8"]["block_bytes"]


def test_quantization_flag_is_validated():
    with pytest.raises(ValueError, match=r"--quantization 'int8' is not supported.*fp8"):
        EngineArgs(quantization="int8")
    with pytest.raises(ValueError, match=r"'awq'.*fp8"):
        load_model("Qwen2.5-7B-Instruct", load_format="dummy", quantization="awq")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert EngineArgs.from_namespace(parser.parse_args(["--quantization", "fp8"])).quantization \
        == "fp8"
    assert EngineArgs.from_namespace(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "gptq"])


def test_tensor_parallel_fp8_same_tokens_and_scales_split_with_their_rows():
    """tp 2 (fake CPU devices) runs the fp8 model as tp 1 does; each device holds its own rows'
    scales, and the report's weight bytes are what device 0 holds."""
    from jax.sharding import PartitionSpec as P
    from tests.scaleout.common import generate_tp, tiny

    model = tiny("tiny_qwen")
    _, base = generate_tp(model, 1, quantization="fp8")
    llm, outs = generate_tp(model, 2, quantization="fp8")
    for b, o in zip(base, outs):
        assert o["token_ids"] == b["token_ids"]
        for lb, lo in zip(b["logprobs"], o["logprobs"]):
            np.testing.assert_allclose([lo[t] for t in lb], list(lb.values()), rtol=1e-4,
                                       atol=1e-4)
    layer = llm.engine.runner.params["model"]["layers"][0]
    qkv = layer["self_attn"]["qkv_proj"]
    assert qkv["weight"].dtype == jnp.float8_e4m3fn
    assert qkv["weight_scale"].sharding.spec == P("tp", None)
    assert layer["mlp"]["down_proj"]["weight_scale"].sharding.spec == P(None)
    dev = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(llm.engine.runner.params)
               for s in x.addressable_shards if s.device == dev)
    assert llm.engine.memory["bytes"]["weights"] == weights_bytes(model.cfg, "float32", 2,
                                                                  "fp8") == held


def test_fp8_weights_with_quantized_kv_caches(tiny_qwen, pin_paths):
    """fp8 weights under every 1-byte (and half-byte) KV dtype: the fp8 cache's static scales are
    bounded from the dequantised weights, and the 1-byte caches stay close to the fp8-weights
    model with a float cache (the first greedy token of every prompt agrees; int4, coarser,
    changes one on this random model, as it does with float weights)."""
    pin_paths(ALL_W8A8)  # the engine's steps and the padded reference's alike
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (3, 17, 30)]
    q = TinyModel(tiny_qwen.cfg, fp8.quantize_params(tiny_qwen.params))
    first = [greedy_reference(q, p, 1)[0] for p in prompts]
    for kv in ("fp8", "int8", "int4"):
        llm = LLM(loaded=tiny_qwen, quantization="fp8", kv_cache_dtype=kv,
                  num_gpu_blocks_override=16, max_model_len=64)
        outs = llm.generate(prompts, SamplingParams(max_tokens=4, logprobs=1, **GREEDY),
                            use_tqdm=False)
        if kv != "int4":
            assert [o.outputs[0].token_ids[0] for o in outs] == first, kv
        assert all(np.isfinite(list(lp.values())).all() for o in outs
                   for lp in o.outputs[0].logprobs), kv

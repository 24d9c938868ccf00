"""The W8A16 skinny matmul (benchmarks/experiments/fp8_matmul_gpu.py, an experiment the engine
does not call) in Pallas interpret mode against a numpy float64 reference on fresh random inputs: row counts from 1 to 64 (read as tiles of 16 rows or
more), channel and feature counts that are not tile multiples (the masked tails), one and several
D splits, the errors bad input gets, and its lowering to Triton IR for CUDA."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from benchmarks.experiments.fp8_matmul_gpu import default_split_k, fp8_matmul
from tests.kernels.seeds import seed_of

# (T, O, D, block_o, block_d, split_k)
CASES = [
    (1, 48, 96, 16, 32, 1),  # O a tile multiple, D one
    (1, 40, 80, 16, 32, 1),  # both ragged: the last channel tile and D tile masked
    (5, 72, 64, 32, 16, 3),  # D split in three (4 tiles: the last split gets one)
    (16, 33, 48, 16, 16, 3),
    (17, 64, 200, 32, 64, 2),  # 17 rows pad to 32
    (64, 24, 40, 16, 16, None),  # the default split
]


def _inputs(t, o, d, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, d)) * rng.lognormal(0, 1, (t, 1))).astype(np.float32)
    # e4m3 codes over their whole range and scales spread across channels, as quantised weights
    w = np.clip(rng.standard_normal((o, d)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    s = rng.lognormal(-8, 1, o).astype(np.float32)
    return x.astype(ml_dtypes.bfloat16), w, s


def _ref(x, w, s):
    return (x.astype(np.float64) @ w.astype(np.float64).T) * s.astype(np.float64)


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(case):
    t, o, d, bo, bd, split = case
    x, w, s = _inputs(t, o, d, seed_of(*case))
    y = fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), block_o=bo, block_d=bd,
                   split_k=split, interpret=True)
    assert y.shape == (t, o) and y.dtype == jnp.bfloat16
    y = np.asarray(y.astype(jnp.float32))
    assert np.isfinite(y).all()
    ref = _ref(x, w, s)
    # bf16 output: half an ulp (2^-9 of the value) plus float32 summation order
    np.testing.assert_allclose(y, ref, rtol=2 ** -8, atol=1e-6 * np.abs(ref).max())


def test_float32_activations_keep_float32():
    x, w, s = _inputs(3, 40, 48, seed_of("f32"))
    x = x.astype(np.float32)
    y = fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), block_o=16, block_d=16,
                   interpret=True)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _ref(x, w, s), rtol=1e-5,
                               atol=1e-6 * np.abs(_ref(x, w, s)).max())


def test_default_split_fills_the_gpu_only_when_the_walk_is_long():
    assert default_split_k(3584, 18944, 32, 256, 132) > 1  # down_proj: 112 tiles, 74 D tiles
    assert default_split_k(37888, 3584, 32, 256, 132) == 1  # gate/up: 1,184 tiles already
    assert default_split_k(64, 64, 32, 32, 132) == 1  # 2 D tiles: too short to split


def test_bad_input_is_refused_by_name():
    x, w, s = (jnp.asarray(a) for a in _inputs(2, 32, 32, 0))
    with pytest.raises(ValueError, match="1 to 64 rows"):
        fp8_matmul(jnp.zeros((65, 32), jnp.bfloat16), w, s, interpret=True)
    with pytest.raises(ValueError, match="30 features but the weight takes 32"):
        fp8_matmul(x[:, :30], w, s, interpret=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_matmul(x, w.astype(jnp.bfloat16), s, interpret=True)
    with pytest.raises(ValueError, match="block_o must be a power of two"):
        fp8_matmul(x, w, s, block_o=24, interpret=True)
    with pytest.raises(ValueError, match="split_k must be 1 to 2"):
        fp8_matmul(x, w, s, block_d=16, split_k=3, interpret=True)
    with pytest.raises(ValueError, match=r"scale \[O\]"):
        fp8_matmul(x, w, s[:-1], interpret=True)


@pytest.mark.parametrize("t,o,d,split", [(1, 3584, 18944, None), (64, 37888, 3584, 1),
                                         (8, 200, 600, 2)])
def test_lowers_to_triton_for_cuda(t, o, d, split):
    """The real lowering (Pallas -> Triton IR), checked on the CPU at Qwen2.5-7B's shapes and a
    ragged one: catches an op interpret mode has and the Triton lowering lacks."""
    sd = jax.ShapeDtypeStruct
    fn = jax.jit(functools.partial(fp8_matmul, split_k=split))
    args = (sd((t, d), jnp.bfloat16), sd((o, d), jnp.float8_e4m3fn), sd((o,), jnp.float32))
    assert "fp8_matmul" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

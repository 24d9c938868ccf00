"""The fp8 KV cache's format: raw fp8 pages (float8_e4m3fn / float8_e5m2 holding the values as
they are; the model applies the static scale outside the kernels). Every attention kernel (GPU-style
and TPU interpret mode) against the reference on the *same* raw pages, the saturating KV writes,
and what dispatch does with 1-byte pages (kv_heads_per_program 2 by default for decode; plain int8
refused).

Inputs follow test_paged_attention.py: fresh random draws, pool pages in a random order, block
table entries past a sequence's blocks far out of range, padded sequences with a stale context,
outputs poisoned (NaN) by interpret mode, context lengths 0/1/15/16/17/long, GQA 1/4/7. fp8 values
convert exactly to bf16 / f32, so kernels and reference see the same numbers and agree to float
rounding.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from pagedjax.kernels import QuantizedPages, quantize_pages, write_kv_ref
from pagedjax.kernels import dispatch
from pagedjax.kernels.dispatch import decode_defaults, ragged_paged_attention, write_kv
from pagedjax.kernels.quantization import qmax, saturate, storage_dtype
from tests.kernels.test_paged_attention import DECODE, RAGGED, random_batch
from tests.kernels.test_quantized_kv import check
from tests.kernels.seeds import seed_of

# (kv dtype, q dtype, N, K, H, block_size): K = 2 takes the kvp-2 decode default, K = 1 cannot
CASES = [
    pytest.param("fp8_e4m3", "bfloat16", 8, 2, 128, 16, id="e4m3-bf16-gqa4-h128-bs16"),
    pytest.param("fp8_e5m2", "float32", 2, 2, 64, 8, id="e5m2-f32-gqa1-h64-bs8"),
    pytest.param("fp8_e4m3", "float32", 7, 1, 64, 32, id="e4m3-f32-gqa7-h64-bs32"),
]


def raw_batch(seed, seqs, name, dtype, n, k, h, bs):
    """A step over raw fp8 pages: values from ~0.03 (e4m3 subnormals) to past qmax (saturated)."""
    q, kp, vp, *meta = random_batch(seed, seqs, n, k, h, bs, "float32")
    rng = np.random.default_rng(seed + 1)
    mag = jnp.asarray(10.0 ** rng.uniform(-1.5, 2.5, kp.shape[:3] + (1,)), jnp.float32)
    fp8 = storage_dtype(name)
    return (q.astype(dtype), saturate(kp * mag, fp8), saturate(vp * mag[::-1], fp8), *meta)



# ---- attention kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_gpu_decode(name, dtype, n, k, h, bs):
    args = raw_batch(seed_of(name, n, k, h, bs), DECODE, name, dtype, n, k, h, bs)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True),
          args, dtype)


def test_gpu_decode_split_and_explicit_kvp1():
    name, dtype, n, k, h, bs = CASES[0].values
    args = raw_batch(seed_of(name, n, k, h, bs, "split"), DECODE, name, dtype, n, k, h, bs)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                 num_splits=4, block_kv=16, kv_heads_per_program=1), args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_gpu_ragged(name, dtype, n, k, h, bs):
    args = raw_batch(seed_of(name, n, k, h, bs, 1), RAGGED, name, dtype, n, k, h, bs)
    check(ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, block_m=16,
                                 block_n=16 if bs != 32 else 32), args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_decode(name, dtype, n, k, h, bs):
    args = raw_batch(seed_of(name, n, k, h, bs, 2), DECODE, name, dtype, n, k, h, bs)
    check(ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, decode_only=True,
                                 pages_per_block=3), args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs", CASES)
def test_tpu_ragged(name, dtype, n, k, h, bs):
    args = raw_batch(seed_of(name, n, k, h, bs, 3), RAGGED, name, dtype, n, k, h, bs)
    check(ragged_paged_attention(*args, backend="pallas-tpu", interpret=True, block_q=8,
                                 pages_per_block=2), args, dtype)


def test_reference_upcasts_raw_pages():
    """The reference on raw fp8 pages is the reference on the same values in float32."""
    q, kp, vp, *meta = raw_batch(5, RAGGED, "fp8_e5m2", "bfloat16", 8, 2, 64, 16)
    np.testing.assert_array_equal(
        np.asarray(ragged_paged_attention(q, kp, vp, *meta, backend="reference")),
        np.asarray(ragged_paged_attention(q, kp.astype(jnp.float32), vp.astype(jnp.float32),
                                          *meta, backend="reference")))


# ---- KV writes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pallas-gpu", "reference"])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_write_kv_saturates_like_the_reference(name, backend):
    """Fused Pallas write and XLA scatter store the same bits; values beyond the format's range
    store +-qmax (a plain cast: NaN for e4m3fn, inf for e5m2); padding slots stay untouched."""
    fp8 = storage_dtype(name)
    assert not np.isfinite(float(jnp.asarray(1e5, jnp.float32).astype(fp8)))  # the premise
    rng = np.random.default_rng(4)
    nb, bs, k, h, t = 9, 8, 2, 64, 13
    pool = [saturate(jnp.asarray(rng.standard_normal((nb, bs, k, h)), jnp.float32), fp8)
            for _ in range(2)]
    new = [rng.standard_normal((t, k, h)) * 10.0 ** rng.uniform(-2, 2, (t, k, 1)) for _ in range(2)]
    for x in new:
        x[2, 0, :4] = (1e4, -1e4, 1e5, -1e5)
    new = [jnp.asarray(x, jnp.bfloat16) for x in new]
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[0, 5, 12]] = -1
    slots[1] = nb * bs - 1
    got = write_kv(*pool, *new, jnp.asarray(slots), backend=backend, interpret=True)
    want = write_kv_ref(*pool, *new, jnp.asarray(slots))
    m = qmax(fp8)
    untouched = np.setdiff1d(np.arange(nb * bs), slots)
    for g, w, before, x in zip(got, want, pool, new):
        assert g.dtype == fp8
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))
        flat = np.asarray(g.astype(jnp.float32)).reshape(nb * bs, k, h)
        assert np.isfinite(flat).all()
        big = np.float32([1e4, -1e4, 1e5, -1e5])
        np.testing.assert_array_equal(flat[slots[2], 0, :4], np.clip(big, -m, m).astype(
            jnp.dtype(fp8)).astype(np.float32))
        before = np.asarray(before.astype(jnp.float32)).reshape(nb * bs, k, h)
        np.testing.assert_array_equal(flat[untouched], before[untouched])
        live = slots >= 0
        np.testing.assert_array_equal(
            flat[slots[live]], np.asarray(saturate(x[live], fp8).astype(jnp.float32)))


# ---- dispatch ----------------------------------------------------------------------------------
def decode_grids(args, **tuning):
    """The grids of the Pallas launches a decode call makes (its jaxpr, traced, not run)."""
    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                yield e.params["grid_mapping"].grid
            for v in e.params.values():
                if isinstance(v, jcore.ClosedJaxpr):
                    yield from walk(v.jaxpr)

    fn = lambda *a: ragged_paged_attention(*a, backend="pallas-gpu", interpret=True,  # noqa: E731
                                           decode_only=True, **tuning)
    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_decode_defaults_to_two_kv_heads_per_program_on_raw_fp8():
    """Grid (rows, K / kv_heads_per_program, splits): raw fp8 pages with an even K launch K / 2
    KV-head programs; an explicit kv_heads_per_program wins; bf16 and QuantizedPages keep K."""
    q, kp, vp, *meta = random_batch(0, DECODE, 8, 2, 64, 16, "bfloat16")
    raw = [saturate(x, jnp.float8_e4m3fn) for x in (kp, vp)]
    per_token = [quantize_pages(x, "fp8_e4m3") for x in (kp, vp)]
    assert [g[1] for g in decode_grids((q, *raw, *meta))] == [1]
    assert [g[1] for g in decode_grids((q, *raw, *meta), kv_heads_per_program=1)] == [2]
    assert [g[1] for g in decode_grids((q, *raw, *meta), num_splits=2)] == [1, 8]  # + combine
    assert [g[1] for g in decode_grids((q, kp, vp, *meta))] == [2]
    assert [g[1] for g in decode_grids((q, *per_token, *meta))] == [2]
    q1, kp1, vp1, *meta1 = random_batch(0, DECODE, 7, 1, 64, 16, "bfloat16")  # K = 1: kvp 1
    raw1 = [saturate(x, jnp.float8_e4m3fn) for x in (kp1, vp1)]
    assert [g[1] for g in decode_grids((q1, *raw1, *meta1))] == [1]
    # the measured tile for raw fp8 (pagedjax/kernels/dispatch.py: decode_defaults)
    assert decode_defaults(raw[0]) == {"kv_heads_per_program": 2, "num_stages": 5}
    assert decode_defaults(kp) == decode_defaults(per_token[0]) == decode_defaults(raw1[0]) == {}


@pytest.mark.parametrize("backend,decode_only", [("pallas-gpu", True), ("pallas-gpu", False),
                                                 ("pallas-tpu", True), ("reference", False)])
def test_plain_int8_pages_raise(backend, decode_only):
    q, kp, vp, *meta = random_batch(0, DECODE, 4, 2, 64, 8, "float32")
    kp, vp = kp.astype(jnp.int8), vp.astype(jnp.int8)
    with pytest.raises(ValueError, match="QuantizedPages"):
        ragged_paged_attention(q, kp, vp, *meta, backend=backend, interpret=True,
                               decode_only=decode_only)
    with pytest.raises(ValueError, match="QuantizedPages"):
        write_kv(kp, vp, q[:, :2], q[:, :2], jnp.zeros(q.shape[0], jnp.int32))


def test_raw_fp8_needs_a_float_q():
    q, kp, vp, *meta = raw_batch(0, DECODE, "fp8_e4m3", "float32", 4, 2, 64, 8)
    with pytest.raises(ValueError, match="q dtype"):
        ragged_paged_attention(q.astype(jnp.float8_e4m3fn), kp, vp, *meta, backend="pallas-gpu",
                               interpret=True)


def test_mosaic_prefill_takes_only_pages_in_qs_dtype(monkeypatch):
    """On a Hopper GPU one long sequence goes to the bf16-only Mosaic kernel; fp8 pages, raw or
    QuantizedPages, stay on the Triton kernel."""
    hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
    monkeypatch.setattr(jax, "devices", lambda *a: [hopper])
    q = jax.ShapeDtypeStruct((128, 8, 64), jnp.bfloat16)
    bt = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    bf16 = jax.ShapeDtypeStruct((16, 16, 2, 64), jnp.bfloat16)
    raw = jax.ShapeDtypeStruct((16, 16, 2, 64), jnp.float8_e4m3fn)
    per_token = QuantizedPages(raw, jax.ShapeDtypeStruct((16, 16, 2, 1), jnp.bfloat16))
    assert dispatch._mosaic_prefill_applies(q, bf16, bt, False)
    assert not dispatch._mosaic_prefill_applies(q, raw, bt, False)
    assert not dispatch._mosaic_prefill_applies(q, per_token, bt, False)

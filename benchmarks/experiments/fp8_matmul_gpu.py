"""W8A16 skinny matmul for GPUs (Pallas, Triton lowering): bf16 activations of a few tokens by a
float8_e4m3fn weight with a float32 scale per output channel, for decode-sized steps. An
experiment (benchmarks/experiments/fp8_gemm.py measures it): on the H100 XLA's own W8A16 fusion,
which models/fp8.py uses, was faster at 1-32 rows, so the engine does not call this.

Why a kernel: at a few tokens a linear is a weight read, and the W8A8 form (models/fp8.py) pays
for an activation quantisation pass and a float32 [T, O] output pass around a dot that XLA does
not lower to the FP8 GEMM below 64 tokens anyway. Here each program owns ``block_o`` output
channels: it walks D ``block_d`` columns at a time, converts the fp8 weight tile to bf16 in
registers (never to memory), accumulates ``x . w^T`` in float32 and multiplies the channel scales
in the epilogue, so the weight's bytes are read once and nothing else of size O x D moves. With
``split_k`` > 1 the D walk is divided among that many programs per channel tile (a GEMV of a few
thousand channels has too few tiles to fill the SMs), which write float32 partials that a small
XLA sum (of T x O, not O x D, values) adds up before the scale.

Rows: Triton's dot takes tiles of at least 16 rows, so x is read as a tile of the next power of
two >= 16 rows, the rows past T masked to zero and never stored (no padded copy of x: at batch-1
decode an extra XLA op per linear costs a launch). Any O and D work: the last channel tile and
the last D tile are masked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pagedjax.kernels.quantization import to_compute

# Tuned on the H100 by benchmarks/experiments/fp8_gemm.py --sweep; the lead sets them from it.
BLOCK_O = 32
BLOCK_D = 256
NUM_WARPS = 4
NUM_STAGES = 3
MAX_ROWS = 64  # the kernel is for decode-sized steps; larger ones belong to the FP8 GEMM


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_split_k(out_features: int, in_features: int, block_o: int, block_d: int,
                    num_sms: int = 132) -> int:
    """Fewest power-of-two D splits that give about two programs per SM, each split at least
    four D tiles long (a shorter walk pays the partials' write for little read)."""
    tiles_o, tiles_d = -(-out_features // block_o), -(-in_features // block_d)
    split = 1
    while tiles_o * split < 2 * num_sms and 2 * split * 4 <= tiles_d:
        split *= 2
    return split


def _kernel(x_ref, w_ref, s_ref, o_ref, *, num_rows, rows, out_features, in_features, block_o,
            block_d, tiles_per_split, split_k):
    # x_ref [T, D] bf16, read as a tile of ``rows`` >= T rows (the rest masked to 0);
    # w_ref [O, D] fp8; s_ref [O] f32;
    # o_ref [T, O] (split_k 1: scaled, x's dtype) or [split_k * T, O] f32 partials.
    ot, k = pl.program_id(0), pl.program_id(1)
    o_idx = ot * block_o + jnp.arange(block_o, dtype=jnp.int32)
    o_ok = o_idx < out_features
    r_idx = jnp.arange(rows, dtype=jnp.int32)
    r_ok = r_idx < num_rows
    d_ragged = in_features % block_d != 0
    tiles_d = -(-in_features // block_d)
    first = k * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, tiles_d)
    zero8 = jnp.zeros((), w_ref.dtype)  # Triton cannot cast an int 0 to fp8

    def body(i, acc):
        d_idx = i * block_d + jnp.arange(block_d, dtype=jnp.int32)
        w_mask, x_mask = o_ok[:, None], r_ok[:, None]
        if d_ragged:
            d_ok = d_idx < in_features
            w_mask, x_mask = w_mask & d_ok[None, :], x_mask & d_ok[None, :]
        w = plgpu.load(w_ref.at[o_idx[:, None], d_idx[None, :]],
                       mask=jnp.broadcast_to(w_mask, (block_o, block_d)), other=zero8)
        x = plgpu.load(x_ref.at[r_idx[:, None], d_idx[None, :]],
                       mask=jnp.broadcast_to(x_mask, (rows, block_d)), other=0)
        w = to_compute(w, x.dtype)  # [block_o, block_d]: in registers only
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first, last, body, jnp.zeros((rows, block_o), jnp.float32))
    store_mask = r_ok[:, None] & o_ok[None, :]
    if split_k == 1:
        scale = plgpu.load(s_ref.at[o_idx], mask=o_ok, other=0.0)
        plgpu.store(o_ref.at[r_idx[:, None], o_idx[None, :]],
                    (acc * scale[None, :]).astype(o_ref.dtype), mask=store_mask)
    else:
        plgpu.store(o_ref.at[(k * num_rows + r_idx)[:, None], o_idx[None, :]], acc,
                    mask=store_mask)


@functools.partial(jax.jit, static_argnames=("block_o", "block_d", "split_k", "num_warps",
                                             "num_stages", "interpret"))
def fp8_matmul(x, weight, scale, *, block_o: int = BLOCK_O, block_d: int = BLOCK_D,
               split_k: int | None = None, num_warps: int = NUM_WARPS,
               num_stages: int = NUM_STAGES, interpret: bool = False):
    """y = x . (weight * scale[:, None])^T for a few tokens.

    x: [T, D] bfloat16 (or float16/float32), T <= MAX_ROWS; weight: [O, D] float8_e4m3fn;
    scale: [O] float32. Returns [T, O] in x's dtype. block_o, block_d: powers of two >= 16;
    split_k: D splits (default ``default_split_k``)."""
    if x.ndim != 2 or weight.ndim != 2 or scale.shape != weight.shape[:1]:
        raise ValueError(f"fp8_matmul takes x [T, D], weight [O, D], scale [O]; got "
                         f"{x.shape}, {weight.shape}, {scale.shape}")
    t, d = x.shape
    o = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"x has {d} features but the weight takes {weight.shape[1]}")
    if weight.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"the weight must be float8_e4m3fn, got {weight.dtype}")
    if not 1 <= t <= MAX_ROWS:
        raise ValueError(f"fp8_matmul takes 1 to {MAX_ROWS} rows, got {t}: larger steps "
                         f"belong to the FP8 GEMM (models/fp8.py)")
    for name, b in (("block_o", block_o), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if split_k is None:
        split_k = default_split_k(o, d, block_o, block_d, _num_sms())
    tiles_d = -(-d // block_d)
    if not 1 <= split_k <= tiles_d:
        raise ValueError(f"split_k must be 1 to {tiles_d} (the D tiles), got {split_k}")
    rows = max(16, _pow2(t))
    tiles_per_split = -(-tiles_d // split_k)
    kernel = functools.partial(_kernel, num_rows=t, rows=rows, out_features=o, in_features=d,
                               block_o=block_o, block_d=block_d,
                               tiles_per_split=tiles_per_split, split_k=split_k)
    out_shape = (jax.ShapeDtypeStruct((t, o), x.dtype) if split_k == 1
                 else jax.ShapeDtypeStruct((split_k * t, o), jnp.float32))
    y = pl.pallas_call(
        kernel, grid=(-(-o // block_o), split_k), out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="fp8_matmul")(x, weight, scale)
    if split_k > 1:
        y = (y.reshape(split_k, t, o).sum(axis=0) * scale).astype(x.dtype)
    return y


def fp8_matmul_ref(x, weight, scale):
    """The same product in XLA: the weight converted to x's dtype inside the dot."""
    y = jnp.dot(x, weight.astype(x.dtype).T, preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def _num_sms() -> int:
    d = jax.devices()[0]
    return int(getattr(d, "core_count", 0) or 132) if d.platform == "gpu" else 8

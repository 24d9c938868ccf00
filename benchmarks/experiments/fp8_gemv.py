"""An fp8 GEMV for decode-sized steps (Pallas, Triton lowering): ``y = x . (weight * scale)^T``
for 1 to 8 token rows, on CUDA cores. An experiment: benchmarks/experiments/fp8_gemv_bench.py
times it against XLA's W8A16 fusion (what models/fp8.py runs at small T); the engine does not
call it.

Why: at batch-1 decode a linear is a weight read, so its time is the fp8 bytes over the bandwidth
it reaches. On the H100 XLA's W8A16 Triton fusions read at 2.1-2.5 TB/s against a ~2.98 TB/s
copy. An earlier Pallas kernel fed tensor cores (``tl.dot`` takes 16 rows or more, so one row was
padded to 16 and the fp8 tile shuffled into an MMA operand layout) and was slower than XLA at
gate/up. A GEMV needs no tensor cores: at one row each weight byte costs a convert and a
multiply-add, far below the SM's float32 rate, so plain loads and FMAs can stream at the copy
bandwidth. By 8 rows the arithmetic per byte is eight times that and nears the float32 rate;
the bench measures where it stops paying.

Design: program (j, k) owns output channels ``[j * block_o, (j + 1) * block_o)`` and the k-th of
``split_d`` near-equal runs of D tiles. Each step of its walk loads one [block_o, block_d] fp8
tile (row-major along D: wide contiguous loads, marked evict-first because each byte is read
once), converts it to float32 in registers, and for each row t of x multiplies it by x[t]'s
[block_d] slice and sums along D into row t's own [block_o] float32 accumulator. The channel
scale is applied in the epilogue. ``split_d`` > 1 is for shapes whose channel tiles alone are
too few to fill the SMs (down_proj: 3584 channels over 18944 features): each split writes scaled
float32 partials [split_d, T, O] that one small XLA sum (T x O values, not O x D) adds up. Only
a tile that can cross an edge is masked: the ragged D tail is peeled off the walk (it belongs to
the last split), so full tiles load without a D mask; the channel mask exists only when O is not
a multiple of block_o.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pagedjax.kernels.quantization import to_compute

# Starting points; fp8_gemv_bench.py sweeps them on the device.
BLOCK_O = 16
BLOCK_D = 512
NUM_WARPS = 4
NUM_STAGES = 2
MAX_ROWS = 8  # one accumulator per row: past 8 rows the FMAs, not the bytes, set the time


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_split_d(out_features: int, in_features: int, block_o: int, block_d: int,
                    num_sms: int = 132) -> int:
    """Fewest power-of-two D splits that give two programs an SM, each split at least two D
    tiles long (a shorter walk pays a partials write for little read)."""
    tiles_o, tiles_d = _cdiv(out_features, block_o), _cdiv(in_features, block_d)
    split = 1
    while tiles_o * split < 2 * num_sms and 2 * split * 2 <= tiles_d:
        split *= 2
    return split


def _kernel(x_ref, w_ref, s_ref, o_ref, *, rows, out_features, in_features, block_o, block_d,
            split_d):
    # x_ref [T, D] (bf16); w_ref [O, D] float8_e4m3fn; s_ref [O] f32;
    # o_ref [T, O] in the output dtype (split_d 1) or [split_d, T, O] f32 partials
    j, k = pl.program_id(0), pl.program_id(1)
    o_idx = j * block_o + jnp.arange(block_o, dtype=jnp.int32)
    o_mask = o_idx < out_features if out_features % block_o else None
    tiles_d, full_tiles = _cdiv(in_features, block_d), in_features // block_d
    first = jax.lax.div(k * tiles_d, split_d)  # balanced: every split gets >= 1 tile
    last = jax.lax.div((k + 1) * tiles_d, split_d)
    zero8 = jnp.zeros((), w_ref.dtype)  # Triton cannot cast an int 0 to fp8

    def tile(i, accs, d_mask):
        d_idx = i * block_d + jnp.arange(block_d, dtype=jnp.int32)
        masks = [m for m in (None if o_mask is None else o_mask[:, None],
                             None if d_mask is None else d_mask[None, :]) if m is not None]
        w_mask = (jnp.broadcast_to(functools.reduce(jnp.logical_and, masks),
                                   (block_o, block_d)) if masks else None)
        w = plgpu.load(w_ref.at[o_idx[:, None], d_idx[None, :]], mask=w_mask,
                       other=zero8 if masks else None, eviction_policy="evict_first")
        w = to_compute(w, jnp.float32)  # [block_o, block_d], in registers only
        out = []
        for t in range(rows):
            x = plgpu.load(x_ref.at[t, d_idx], mask=d_mask,
                           other=0 if d_mask is not None else None)  # [block_d]
            out.append(accs[t] + jnp.sum(w * x.astype(jnp.float32)[None, :], axis=1))
        return tuple(out)

    accs = tuple(jnp.zeros((block_o,), jnp.float32) for _ in range(rows))
    accs = jax.lax.fori_loop(first, jnp.minimum(last, full_tiles),
                             lambda i, a: tile(i, a, None), accs)
    if full_tiles < tiles_d:  # the ragged D tail: the last split's last tile
        d_idx = full_tiles * block_d + jnp.arange(block_d, dtype=jnp.int32)
        accs = tile(full_tiles, accs, (d_idx < in_features) & (k == split_d - 1))

    scale = plgpu.load(s_ref.at[o_idx], mask=o_mask,
                       other=0.0 if o_mask is not None else None)  # [block_o]
    for t in range(rows):
        y = accs[t] * scale
        if split_d == 1:
            plgpu.store(o_ref.at[t, o_idx], y.astype(o_ref.dtype), mask=o_mask)
        else:
            plgpu.store(o_ref.at[k, t, o_idx], y, mask=o_mask)


@functools.partial(jax.jit, static_argnames=("block_o", "block_d", "split_d", "num_warps",
                                             "num_stages", "out_dtype", "interpret"))
def fp8_gemv(x, weight, scale, *, block_o: int = BLOCK_O, block_d: int = BLOCK_D,
             split_d: int | None = None, num_warps: int = NUM_WARPS,
             num_stages: int = NUM_STAGES, out_dtype=None, interpret: bool = False):
    """y = x . (weight * scale[:, None])^T for a few tokens, accumulated in float32.

    x: [T, D] bfloat16 (or float16 / float32), 1 <= T <= MAX_ROWS; weight: [O, D]
    float8_e4m3fn; scale: [O] float32. Returns [T, O] in ``out_dtype`` (default x's dtype).
    block_o, block_d: powers of two (the tile); split_d: runs of D tiles per channel tile, 1 to
    the number of D tiles (default ``default_split_d``); num_warps, num_stages: Triton's."""
    if x.ndim != 2 or weight.ndim != 2 or scale.shape != weight.shape[:1]:
        raise ValueError(f"fp8_gemv takes x [T, D], weight [O, D], scale [O]; got "
                         f"{x.shape}, {weight.shape}, {scale.shape}")
    t, d = x.shape
    o = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"x has {d} features but the weight takes {weight.shape[1]}")
    if weight.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"the weight must be float8_e4m3fn, got {weight.dtype}")
    if not 1 <= t <= MAX_ROWS:
        raise ValueError(f"fp8_gemv takes 1 to {MAX_ROWS} rows, got {t}: larger steps belong "
                         f"to a GEMM (models/fp8.py)")
    if o * d >= 2**31:
        raise ValueError(f"a weight of {o} x {d} values overflows the kernel's int32 offsets; "
                         f"split it into row blocks of fewer than 2**31 values")
    for name, b in (("block_o", block_o), ("block_d", block_d)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two (a Triton tile), got {b}")
    tiles_d = _cdiv(d, block_d)
    if split_d is None:
        split_d = default_split_d(o, d, block_o, block_d, _num_sms())
    if not 1 <= split_d <= tiles_d:
        raise ValueError(f"split_d must be 1 to {tiles_d} (the D tiles of {block_d}), "
                         f"got {split_d}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    kernel = functools.partial(_kernel, rows=t, out_features=o, in_features=d,
                               block_o=block_o, block_d=block_d, split_d=split_d)
    out_shape = (jax.ShapeDtypeStruct((t, o), out_dtype) if split_d == 1
                 else jax.ShapeDtypeStruct((split_d, t, o), jnp.float32))
    y = pl.pallas_call(
        kernel, grid=(_cdiv(o, block_o), split_d), out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="fp8_gemv")(x, weight, scale)
    return y if split_d == 1 else y.sum(axis=0).astype(out_dtype)


def fp8_gemv_ref(x, weight, scale, out_dtype=None):
    """The same product in XLA, float32 throughout."""
    y = jnp.dot(x.astype(jnp.float32), weight.astype(jnp.float32).T,
                precision=jax.lax.Precision.HIGHEST)
    return (y * scale).astype(out_dtype or x.dtype)


def _num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 8

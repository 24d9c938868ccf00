"""int4 KV pages inside a GPU kernel (Pallas on Triton): a tile of packed codes gathered from the
pool and unpacked in registers, for the decode and the ragged kernels alike.

The pool's layout (pagedjax/kernels/quantization.py): each token's [H / 2] code bytes hold channel
c in the low nibble and channel c + H / 2 in the high one, so a tile unpacks into the low and high
halves of the head dim with no interleave; K's values are ``nibble * scale + zero`` with a
float8_e4m3fn scale and zero point per channel of a block, V's ``(nibble - 8)`` times a per-token
scale the kernels put on the probabilities.

Two ways to make floats of them: float32 arithmetic from integer nibbles (the default), or
float16 from the nibbles' bit patterns (``int4_dtype="float16"`` in the decode kernel), in jnp or
in PTX (``int4_asm``); why, and what each costs: benchmarks/KERNEL_NOTES.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from .quantization import to_compute, unpack_int4, unpack_nibbles

INT4_ASM = ("none", "unpack", "dequant")  # how much of the float16 dequantization is PTX


def load_int4(k_ref, v_ref, ks_ref, rows, page, kh, head_dim, live, dtype, asm: str = "none"):
    """K and V of KV head ``kh`` at pool rows ``rows`` [n] of an int4 pool, unpacked in
    registers: ([k_lo, k_hi], [v_lo, v_hi]), each [n, H / 2] in ``dtype``, the low and high
    halves of the head dim. K is dequantized by its block's channel parameters (ks_ref
    [num_blocks * 2, K * H] float8_e4m3fn: rows 2 page and 2 page + 1, the scale and the zero
    point, of each token's ``page`` [n]); V stays bare codes (its per-token scale goes on the
    probabilities). ``live`` [n] masks the gathers (masked lanes give 0); None: all in range.
    float16 ``dtype``: the nibbles become floats by bit pattern (``nibbles_f16``) and K's
    dequantization runs in float16 (fp8 parameters convert to it directly); ``asm`` (GPU only)
    "unpack" does the former in PTX, "dequant" K's whole dequantization too
    (``int4_f16_asm``). Otherwise the dequantization runs in float32, converted to ``dtype``."""
    half = head_dim // 2
    hd = jnp.arange(half, dtype=jnp.int32)
    mask = None if live is None else jnp.broadcast_to(live[:, None], (rows.shape[0], half))

    def gather(ref, idx):  # every ref here holds 1-byte values: a masked lane reads that zero
        return ref[idx] if mask is None else plgpu.load(ref.at[idx], mask=mask,
                                                        other=jnp.zeros((), ref.dtype))

    byte_cols = (kh * half + hd)[None, :]
    k_codes = gather(k_ref, (rows[:, None], byte_cols))
    v_codes = gather(v_ref, (rows[:, None], byte_cols))
    params = [[gather(ks_ref, (2 * page[:, None] + i, (kh * head_dim + c0 + hd)[None, :]))
               for i in (0, 1)] for c0 in (0, half)]  # [[scale, zero] of the low half, high]
    if jnp.dtype(dtype) != jnp.float16:
        f32 = jnp.float32
        k_parts = [(n.astype(f32) * to_compute(sc, f32) + to_compute(z, f32)).astype(dtype)
                   for n, (sc, z) in zip(unpack_nibbles(k_codes), params)]
        return k_parts, [c.astype(dtype) for c in unpack_int4(v_codes)]
    if asm == "dequant":
        return list(int4_f16_asm(k_codes, 0, params)), list(int4_f16_asm(v_codes, 8))
    unpack = int4_f16_asm if asm == "unpack" else nibbles_f16
    k_parts = [n * to_compute(sc, dtype) + to_compute(z, dtype)
               for n, (sc, z) in zip(unpack(k_codes, 0), params)]
    return k_parts, list(unpack(v_codes, 8))


def nibbles_f16(data, offset: int):
    """[n, H / 2] uint8 -> (low, high) nibbles minus ``offset`` as float16, with no int-to-float
    conversion: the bits 0x6400 | nibble are the float16 1024 + nibble (exact, as is the
    subtraction)."""
    x = data.astype(jnp.uint16)
    return tuple(jax.lax.bitcast_convert_type(n | 0x6400, jnp.float16) - (1024 + offset)
                 for n in (x & 15, x >> 4))


def int4_f16_asm(data, offset: int, params=None):
    """``nibbles_f16`` in PTX, four code bytes a 32-bit register (FasterTransformer's int4
    unpack): two byte permutes spread them over 16-bit lanes, a lop3 makes 0x6400 | nibble of
    two lanes at once and a float16x2 subtraction takes 1024 + ``offset`` off both. ``params``
    [[scale, zero] of the low half, of the high half] (float8_e4m3fn, each like ``data``): also
    nibble * scale + zero, the fp8 pairs converted to float16x2 and one fma.rn.f16x2 per two
    values. One asm call per half: Pallas's Triton lowering of an inline asm with several
    results returns one (jax 0.10 and 0.11; tests/kernels/test_int4_ptx.py lowers it for CUDA).
    GPU only (interpret mode cannot run PTX: it runs ``nibbles_f16``; the PTX's CPU check is
    tests/kernels/test_int4_ptx.py)."""
    out = jax.ShapeDtypeStruct(data.shape, jnp.float16)
    halves = []
    for high in (False, True):
        args = [data] + ([] if params is None else
                         [jax.lax.bitcast_convert_type(x, jnp.uint8) for x in params[high]])
        [half] = plgpu.elementwise_inline_asm(
            int4_f16_ptx(offset, params is not None, high), args=args,
            constraints="=r,=r," + ",".join("r" * len(args)), pack=4, result_shape_dtypes=[out])
        halves.append(half)
    return tuple(halves)


def int4_f16_ptx(offset: int, dequant: bool, high: bool) -> str:
    """The PTX of one half of ``int4_f16_asm``: $0, $1 the outputs (values 0-1 and 2-3 of four,
    from the low nibbles or, ``high``, the high ones), $2 four code bytes, $3 and $4
    (``dequant``) four fp8 scales and zero points of that half."""
    bias = 0x6400 + offset  # 1024 + offset as float16 (offset < 16: exact)
    lines = [".reg .b32 t0, t1, zero, mask, magic, bias, r0, r1, s, z;",
             ".reg .b16 a, b;",
             "mov.b32 zero, 0;", "mov.b32 mask, 0x000f000f;", "mov.b32 magic, 0x64006400;",
             f"mov.b32 bias, {bias << 16 | bias};",
             "prmt.b32 t0, $2, zero, 0x4140;",  # [b0, 0, b1, 0]
             "prmt.b32 t1, $2, zero, 0x4342;"]  # [b2, 0, b3, 0]
    if high:
        lines += ["shr.u32 t0, t0, 4;", "shr.u32 t1, t1, 4;"]
    lines += ["lop3.b32 r0, t0, mask, magic, 0xea;",  # (t & mask) | magic
              "lop3.b32 r1, t1, mask, magic, 0xea;",
              "sub.f16x2 r0, r0, bias;", "sub.f16x2 r1, r1, bias;"]
    if dequant:
        for pair in range(2):
            lines += ["mov.b32 {a, b}, $3;", f"cvt.rn.f16x2.e4m3x2 s, {'ab'[pair]};",
                      "mov.b32 {a, b}, $4;", f"cvt.rn.f16x2.e4m3x2 z, {'ab'[pair]};",
                      f"fma.rn.f16x2 r{pair}, r{pair}, s, z;"]
    lines += ["mov.b32 $0, r0;", "mov.b32 $1, r1;"]
    return "{\n" + "\n".join(lines) + "\n}"

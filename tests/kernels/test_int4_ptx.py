"""The int4 decode kernel's PTX (``int4_f16_ptx``) run by a small emulator of the instructions it
uses, on random code bytes and fp8 parameters: the byte permutes, masks and lane order it assumes
give each value's own nibble (and, dequantizing, its own scale and zero point). Interpret mode
cannot run PTX, so this is what the CPU checks of it; the GPU kernel is checked against the
reference by the kernel scenario before it is timed. And the decode kernel with its PTX is lowered
for CUDA here (Pallas's Triton lowering runs on the CPU): a form that does not lower fails on the
CPU, not first on the device."""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from pagedjax.kernels.decode_attention_gpu import paged_decode_attention
from pagedjax.kernels.int4_gpu import int4_f16_ptx
from tests.kernels.test_int4_kv import int4_batch
from tests.kernels.test_paged_attention import DECODE


def f16_lanes(x: int) -> np.ndarray:
    return np.array([x & 0xFFFF, x >> 16], np.uint16).view(np.float16)


def f16_word(lanes) -> int:
    lo, hi = np.asarray(lanes, np.float16).view(np.uint16).astype(int)
    return int(lo) | int(hi) << 16


def prmt(a: int, b: int, sel: int) -> int:
    pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    assert all((sel >> 4 * i) & 8 == 0 for i in range(4)), "sign-replicate mode not emulated"
    return sum(pool[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def lop3(a: int, b: int, c: int, lut: int) -> int:
    bit = lambda x, i: (x >> i) & 1  # noqa: E731
    return sum(((lut >> (bit(a, i) << 2 | bit(b, i) << 1 | bit(c, i))) & 1) << i
               for i in range(32))


def run_ptx(text: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute ``text`` on 32-bit ``operands`` ($2.. inputs); returns every register."""
    reg = dict(operands)

    def val(tok: str) -> int:
        return reg[tok] if tok in reg else int(tok, 0)

    for line in text.strip().strip("{}").strip().splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            names, src = rest[1:].split("}")
            lo, hi = (n.strip() for n in names.split(","))
            w = val(src.strip(", "))
            reg[lo], reg[hi] = w & 0xFFFF, w >> 16
            continue
        d, *src = (t.strip() for t in rest.split(","))
        if op == "mov.b32":
            reg[d] = val(src[0]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            reg[d] = prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3.b32":
            reg[d] = lop3(*(val(s) for s in src))
        elif op == "shr.u32":
            reg[d] = val(src[0]) >> val(src[1])
        elif op == "sub.f16x2":
            reg[d] = f16_word(f16_lanes(val(src[0])).astype(np.float64)
                              - f16_lanes(val(src[1])).astype(np.float64))
        elif op == "cvt.rn.f16x2.e4m3x2":
            pair = np.array([val(src[0]) & 0xFF, val(src[0]) >> 8], np.uint8)
            reg[d] = f16_word(pair.view(ml_dtypes.float8_e4m3fn).astype(np.float16))
        elif op == "fma.rn.f16x2":  # one rounding: the float64 product and sum are exact here
            a, b, c = (f16_lanes(val(s)).astype(np.float64) for s in src)
            reg[d] = f16_word(a * b + c)
        else:
            raise AssertionError(f"instruction not emulated: {line}")
    return reg


def word(bytes4) -> int:
    return int(np.asarray(bytes4, np.uint8).view("<u4")[0])


@pytest.mark.parametrize("offset", [0, 8])
@pytest.mark.parametrize("dequant", [False, True], ids=["unpack", "dequant"])
def test_ptx_gives_each_value_its_own_nibble_and_parameters(offset, dequant):
    rng = np.random.default_rng(7 + offset + dequant)
    texts = [int4_f16_ptx(offset, dequant, high) for high in (False, True)]
    for _ in range(64):
        codes = rng.integers(0, 256, 4).astype(np.uint8)
        params = [rng.uniform(-6, 6, 4).astype(ml_dtypes.float8_e4m3fn) for _ in range(4)]
        for h, nibbles in enumerate((codes & 15, codes >> 4)):  # the low half, the high half
            ops = {"$2": word(codes), "$3": word(params[2 * h].view(np.uint8)),
                   "$4": word(params[2 * h + 1].view(np.uint8))}
            reg = run_ptx(texts[h], ops)
            out = np.concatenate([f16_lanes(reg["$0"]), f16_lanes(reg["$1"])])
            want = nibbles.astype(np.float64) - offset
            if dequant:
                scale, zero = (params[2 * h + i].astype(np.float64) for i in (0, 1))
                want = want * scale + zero
            np.testing.assert_array_equal(out, want.astype(np.float16))


@pytest.mark.parametrize("asm", ["none", "unpack", "dequant"])
def test_decode_kernel_with_its_ptx_lowers_for_cuda(asm):
    q, kp, vp, bt, cl, qsl = int4_batch(5, DECODE, "bfloat16", 8, 2, 128, 16)
    kernel = jax.jit(lambda *a: paged_decode_attention(*a, scale=0.125, int4_dtype="float16",
                                                       int4_asm=asm))
    text = kernel.trace(q, kp, vp, bt, cl, qsl).lower(lowering_platforms=("cuda",)).as_text()
    assert ("inline_asm" in text) == (asm != "none")

"""Which int4 KV scheme costs SmolLM2-135M its perplexity (issue 22): a simulation, no kernels.

Each scheme fake-quantizes K (after RoPE) and V of every layer inside a dense causal forward
(what a prefill that attends over its own freshly written pages sees), and the perplexity of
tokens 2 to N of the first N tokens of benchmarks/data/alice29.txt is printed (``long-context``
scores tokens 2 to N - 1 of an N - 1-token prompt, so its bf16 figure differs slightly). Blocks
(K's quantization groups) are the pool's 16 tokens, or ``--block``.

    python -m benchmarks.experiments.int4_schemes --context 4096
    python -m benchmarks.experiments.int4_schemes --context 4096 --block 32 --schemes bf16,asym

Schemes (K side, V side): ``none`` keeps bf16; ``engine`` is the engine's K write
(kernels/reference.write_int4_keys: asymmetric per channel within a block, fp8 scale and zero
point) of the whole context in one step, ``engine_by_token`` the same write a token at a time, as
decode writes; ``running`` the previous engine's K (symmetric per channel within a block, the
running absmax, codes re-rounded as it grows); ``absmax`` symmetric with the block's own absmax
per channel; ``token`` the engine's V (symmetric per token, codes -7..7); ``asym_*`` min/max with
a zero point (KIVI), codes 0..15, per channel within a block (K) or per token (V).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import reference
from pagedjax.kernels.quantization import (KEY_PARAM_DTYPE, QuantizedPages, dequantize,
                                           dequantize_pages, quantize, quantize_channels)
from pagedjax.models import decoder

BLOCK = 16


def _blocks(x):  # [T, K, H] -> [T / BLOCK, BLOCK, K, H]
    return x.reshape(-1, BLOCK, *x.shape[1:])


def _empty_keys(t, kh, h):
    return QuantizedPages(jnp.zeros((t // BLOCK, BLOCK, kh, h // 2), jnp.uint8),
                          jnp.zeros((t // BLOCK, 2, kh, h), KEY_PARAM_DTYPE))


def k_engine(x):
    """The engine's write of all the keys in one step (whole blocks: ``quantize_channels``)."""
    return dequantize(*quantize_channels(_blocks(x))).reshape(x.shape)


def k_engine_by_token(x):
    """The engine's write, one token a step (a block's parameters re-derived, and its earlier
    codes re-rounded, only when a channel leaves its range)."""
    t, kh, h = x.shape

    def step(pages, i):
        return reference.write_int4_keys(pages, x[i][None], i[None]), None

    pages, _ = jax.lax.scan(step, _empty_keys(t, kh, h), jnp.arange(t, dtype=jnp.int32))
    return dequantize_pages(pages).reshape(x.shape)


def _bf16_up(a):
    return (a * (1.0 + 2.0 ** -8)).astype(jnp.bfloat16).astype(jnp.float32)


def _sym_params(lo, hi):  # the previous engine's K: symmetric, absmax / 7, as (zero, scale)
    s = _bf16_up(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / 7.0)
    s = jnp.where(s == 0, 1.0, s)
    return -8.0 * s, s


def k_running(x):
    """The previous engine's K write: symmetric per channel within a block, a token at a time."""
    return k_asym_running(x, _sym_params)


def k_absmax(x):
    """Symmetric per channel within a block, the whole block's absmax."""
    b = _blocks(x.astype(jnp.float32))
    s = _bf16_up(jnp.max(jnp.abs(b), axis=1, keepdims=True) / 7.0)
    s = jnp.where(s == 0, 1.0, s)
    return (jnp.clip(jnp.round(b / s), -7, 7) * s).reshape(x.shape)


def v_token(x):
    return dequantize(*quantize(x, jnp.uint8))


def _asym(x, axis):
    """min/max codes 0..15 along ``axis``; scale rounded up to bf16, zero point the bf16 min."""
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=axis, keepdims=True).astype(jnp.bfloat16).astype(jnp.float32)
    s = (jnp.max(x, axis=axis, keepdims=True) - lo) / 15.0
    s = (s * (1.0 + 2.0 ** -8)).astype(jnp.bfloat16).astype(jnp.float32)
    s = jnp.where(s == 0, 1.0, s)
    codes = jnp.clip(jnp.floor((x - lo) / s + 0.5), 0, 15)
    return codes * s + lo


def _bf16_params(lo, hi):  # (zero point, scale) in bfloat16
    bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    s = bf((hi - lo) / 15.0 * (1.0 + 2.0 ** -8))
    return bf(lo), jnp.where(s == 0, 1.0, s)


def _fp8_params(lo, hi):  # (zero point, scale) in float8_e4m3fn, as ``k_asym_fp8``
    f8 = lambda a: a.astype(jnp.float8_e4m3fn).astype(jnp.float32)  # noqa: E731
    z = f8(lo - jnp.abs(lo) * 2.0 ** -4)
    s = f8((hi - z) / 15.0 * (1.0 + 2.0 ** -3))
    return z, jnp.where(s == 0, 1.0, s)


def k_asym_running(x, params=_bf16_params):
    """``asym`` per channel within a block, written a token at a time as decode writes: the
    block's min/max grow, and the earlier codes are re-rounded to the new scale and zero point."""
    b = jnp.swapaxes(_blocks(x.astype(jnp.float32)), 0, 1)  # [BLOCK, nb, K, H]

    def step(carry, xt):
        lo, hi, codes, t = carry
        old_z, old_s = params(lo, hi)
        lo, hi = jnp.where(t == 0, xt, jnp.minimum(lo, xt)), jnp.where(t == 0, xt, jnp.maximum(hi, xt))
        z, s = params(lo, hi)
        codes = jnp.clip(jnp.floor((codes * old_s + old_z - z) / s + 0.5), 0, 15)
        codes = codes.at[t].set(jnp.clip(jnp.floor((xt - z) / s + 0.5), 0, 15))
        return (lo, hi, codes, t + 1), None

    init = (b[0], b[0], jnp.zeros_like(b), 0)
    (lo, hi, codes, _), _ = jax.lax.scan(step, init, b)
    z, s = params(lo, hi)
    return jnp.swapaxes(codes * s + z, 0, 1).reshape(x.shape)


def k_asym_fp8(x):
    """``asym`` per channel within a block with the zero point and the scale stored in
    float8_e4m3fn (2 bytes a channel, as the symmetric bf16 scale): the zero point rounded down
    from the min, the scale rounded up from (max - zero) / 15, so nothing clips."""
    b = _blocks(x.astype(jnp.float32))
    f8 = lambda a: a.astype(jnp.float8_e4m3fn).astype(jnp.float32)  # noqa: E731
    lo = jnp.min(b, axis=1, keepdims=True)
    z = f8(lo - jnp.abs(lo) * 2.0 ** -4)
    s = f8((jnp.max(b, axis=1, keepdims=True) - z) / 15.0 * (1.0 + 2.0 ** -3))
    s = jnp.where(s == 0, 1.0, s)
    codes = jnp.clip(jnp.floor((b - z) / s + 0.5), 0, 15)
    return (codes * s + z).reshape(x.shape)


def k_asym_zq(x):
    """``asym`` per channel within a block, 2 bytes a channel: a float8_e4m3fn scale (rounded
    up) and an int8 zero point in steps (rounded down), value = (code + zero) * scale. The step
    is widened where the offset would need more than 120 steps."""
    b = _blocks(x.astype(jnp.float32))
    lo, hi = jnp.min(b, axis=1, keepdims=True), jnp.max(b, axis=1, keepdims=True)
    s = jnp.maximum((hi - lo) / 14.0, jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / 120.0)
    s = (s * (1.0 + 2.0 ** -3)).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    s = jnp.where(s == 0, 1.0, s)
    zq = jnp.clip(jnp.floor(lo / s), -128, 127)
    codes = jnp.clip(jnp.floor(b / s - zq + 0.5), 0, 15)
    return ((codes + zq) * s).reshape(x.shape)


def k_asym(x):
    return _asym(_blocks(x), 1).reshape(x.shape)


def v_asym(x):
    return _asym(x, -1)


SCHEMES = {  # name: (K, V)
    "bf16": (None, None),
    "engine": (k_engine, v_token),
    "engine_by_token": (k_engine_by_token, v_token),
    "previous": (k_running, v_token),
    "k_only": (k_running, None),
    "v_only": (None, v_token),
    "k_block_absmax": (k_absmax, v_token),
    "asym": (k_asym, v_asym),
    "k_absmax_v_asym": (k_absmax, v_asym),
    "k_asym_v_token": (k_asym, v_token),
    "asym_running": (k_asym_running, v_asym),
    "k_asym_running_v_token": (k_asym_running, v_token),
    "k_asym_fp8_v_token": (k_asym_fp8, v_token),
    "k_asym_zq_v_token": (k_asym_zq, v_token),
    "k_asym_fp8_running_v_token": (lambda x: k_asym_running(x, _fp8_params), v_token),
}


def make_layer(cfg, kq, vq):
    inv_freq = decoder.rope_inv_freq(cfg)

    @jax.jit
    def layer(x, p, positions):
        h = decoder.rms_norm(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
        q, k, v = decoder._qkv(h, p["self_attn"], cfg, positions, inv_freq)
        if kq is not None:
            k = kq(k[0]).astype(k.dtype)[None]
        if vq is not None:
            v = vq(v[0]).astype(v.dtype)[None]
        o = decoder.causal_attention(q, k, v)
        x = x + decoder._linear(o.reshape(*o.shape[:-2], -1), p["self_attn"]["o_proj"])
        h = decoder.rms_norm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        return x + decoder._mlp(h, p["mlp"])
    return layer


def perplexity(params, cfg, ids, kq, vq):
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1])[None]
    layer = make_layer(cfg, kq, vq)
    x = jnp.take(params["model"]["embed_tokens"]["weight"], tokens, axis=0)
    for p in params["model"]["layers"]:
        x = layer(x, p, positions)
    x = decoder.rms_norm(x, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    logp = jax.nn.log_softmax(decoder.lm_head(params, cfg, x)[0], axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp[:-1], tokens[0, 1:, None], axis=-1))[:, 0]
    return math.exp(float(nll.mean()))


def main():
    global BLOCK
    from benchmarks.long_context import TEXT, text_ids
    from pagedjax.models.embedded import embedded_model_path
    from pagedjax.models.loader import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--block", type=int, default=BLOCK, help="tokens per K group (the block)")
    args = ap.parse_args()
    BLOCK = args.block
    loaded = load_model(embedded_model_path(), dtype="bfloat16")
    # N tokens: a whole number of blocks
    ids = text_ids(loaded.tokenizer, TEXT)[:args.context]
    out = {}
    for name in args.schemes.split(","):
        t0 = time.perf_counter()
        ppl = perplexity(loaded.params, loaded.cfg, ids, *SCHEMES[name])
        out[name] = ppl
        base = out.get("bf16")
        delta = f"{100 * (ppl / base - 1):+.2f}%" if base else ""
        print(f"{name:16s} ppl {ppl:8.3f} {delta:>8s}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

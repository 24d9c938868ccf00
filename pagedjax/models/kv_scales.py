"""Static fp8 KV-cache scales: one power of two per layer and KV head, derived from the weights.

An fp8 KV cache (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``) stores ``k / s_k`` and ``v / s_v`` as
plain 1-byte pages, with scales fixed before the first token: a bound that no K (or V) value of
the KV head can exceed, mapped to the format's largest value and rounded up to a power of two.

The bound. A layer's attention input is ``h = g * x / rms(x)`` (RMSNorm), and ``x / rms(x)`` has
norm at most ``sqrt(d)`` (exactly that without eps), so output j of a projection ``W, b`` obeys
``|h . W[j] + b_j| <= sqrt(d) * ||g * W[j]|| + |b_j|`` (Cauchy-Schwarz). RoPE rotates K's dims
(j, j + H/2) as a pair, so a rotated K value is bounded by the pair's norm. Stored values therefore
never saturate, whatever the prompt; and since fp8 is floating point the headroom costs no
relative precision until values fall below the normal range (2^15 below the largest e4m3 value).
Powers of two make the scaling exact in bf16: with an fp8 cache the model computes the same q.k
and p.v as without, up to the fp8 rounding of the stored values.

Where they apply (pagedjax/models/decoder.py, ``forward_paged``): q * s_k (each query head by its KV
head's scale), k / s_k and v / s_v before the KV write, the attention output * s_v. The kernels
never see a scale: they attend over the stored numbers.

Measured on SmolLM2-135M (tests/data/paragraph.txt, float32 model, against bf16 KV): the bounds
sit 5-20x above the largest values the paragraph produces, 0.2-0.4% of the stored values are
e4m3 subnormals; through the engine's paged path perplexity -0.03%, mean KL 5.0e-3 nats/token (a
scale per token and KV head: 3.3e-3; pagedjax/kernels/quantization.py has the comparison). In
exchange the pool holds exactly 2x bf16's tokens and decode reads no scales
(benchmarks/KERNEL_NOTES.md).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .fp8 import dequantize_weight
from .fused import qkv_parts

# Slack for bf16 rounding of the activations: the bound holds for exact arithmetic.
ROUNDING_SLACK = 1.0 + 2.0 ** -6
# With fp8 weights the projection reads h rounded to float8_e4m3fn per token: normal values move
# by at most a relative 2^-4 (3 mantissa bits, round to nearest), so the norm by about that much
# (subnormals, below 2^-6 of the token's largest value, move by less than its 2^-10).
FP8_INPUT_SLACK = 1.0 + 2.0 ** -4


def _row_bounds(proj, gain, d: int) -> jnp.ndarray:
    """Largest |output| per output row of ``proj`` for any RMS-normalised input of width d."""
    w = dequantize_weight(proj) * gain.astype(jnp.float32)[None, :]
    bound = np.sqrt(d) * jnp.linalg.norm(w, axis=1)
    # fp8 weights: the step rounds h to e4m3 first (pagedjax/models/fp8.py)
    if "weight_scale" in proj:
        bound = bound * FP8_INPUT_SLACK
    if "bias" in proj:
        bound = bound + jnp.abs(proj["bias"].astype(jnp.float32))
    return bound


def layer_kv_scales(cfg: ModelConfig, layer, qmax: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(s_k, s_v), each [K] float32 powers of two, for one decoder layer's parameters."""
    kh, h, d = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    gain = layer["input_layernorm"]["weight"]
    # k/v rows of qkv_proj when fused (pagedjax/models/fused.py)
    proj = qkv_parts(cfg, layer["self_attn"])
    k = _row_bounds(proj["k_proj"], gain, d).reshape(kh, h)
    k = jnp.sqrt(k[:, : h // 2] ** 2 + k[:, h // 2:] ** 2)  # RoPE pairs (rotate-half layout)
    v = _row_bounds(proj["v_proj"], gain, d).reshape(kh, h)

    def pow2(bound):  # [K] -> smallest power of two >= bound / qmax (1 for an all-zero head)
        s = jnp.max(bound, axis=1) * (ROUNDING_SLACK / qmax)
        return jnp.where(s > 0, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(s > 0, s, 1.0)))), 1.0)

    return pow2(k), pow2(v)


def with_kv_scales(cfg: ModelConfig, params, qmax: float):
    """``params`` with ``k_scale`` / ``v_scale`` ([K] float32, vLLM's names) added to every
    layer's ``self_attn``; the weights are shared, not copied."""
    layers = []
    for layer in params["model"]["layers"]:
        s_k, s_v = layer_kv_scales(cfg, layer, qmax)
        layers.append({**layer, "self_attn": {**layer["self_attn"], "k_scale": s_k,
                                              "v_scale": s_v}})
    return {**params, "model": {**params["model"], "layers": layers}}


def _per_query_head(scale, n: int, dtype):
    """[K] -> [N, 1]: each query head gets its KV head's scale (heads grouped K-major)."""
    return jnp.repeat(scale, n // scale.shape[0])[:, None].astype(dtype)


def scale_for_cache(q, k, v, attn):
    """q [T, N, H] * s_k, k [T, K, H] / s_k, v / s_v: what an fp8 cache stores and attends with.
    Identity when the layer has no scales (any other cache dtype)."""
    if "k_scale" not in attn:
        return q, k, v
    s_k, s_v = attn["k_scale"], attn["v_scale"]
    q = q * _per_query_head(s_k, q.shape[1], q.dtype)
    k = k * (1.0 / s_k)[:, None].astype(k.dtype)
    v = v * (1.0 / s_v)[:, None].astype(v.dtype)
    return q, k, v


def unscale_output(o, attn):
    """Attention output [T, N, H] * s_v (the stored V was divided by it)."""
    if "v_scale" not in attn:
        return o
    return o * _per_query_head(attn["v_scale"], o.shape[1], o.dtype)

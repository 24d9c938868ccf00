"""One functional decoder for Llama 2/3/3.1 and Qwen2/2.5.

Einsum letters: B batch, T tokens, N query heads, K kv heads, G query heads per kv head, H head
dim, D model dim, F MLP dim, V vocab, S key positions, R tensor-parallel blocks of a fused
projection (O its rows per block).

Parameters are a plain pytree with Hugging Face names (``params["model"]["layers"][i]
["self_attn"]["q_proj"]["weight"]`` is ``model.layers.{i}.self_attn.q_proj.weight``), weights kept
in Hugging Face's ``[out, in]`` orientation. The engine runs q/k/v and gate/up fused instead
(``self_attn.qkv_proj`` and ``mlp.gate_up_proj``, weights [R, O, D]: pagedjax/models/fused.py); both
layouts run here. A linear with a ``weight_scale`` beside its weight is fp8 (``--quantization fp8``,
pagedjax/models/fp8.py) and runs as an FP8 GEMM. The attention call is a seam: ``forward_dense``
runs full causal attention over whole sequences (the parity and reference path); ``forward_paged``
hands q/k/v to an attention function that writes the new K/V into the paged pool and attends over it
(the engine path).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import fp8, fused
from .config import ModelConfig
from .kv_scales import scale_for_cache, unscale_output

Params = dict[str, Any]


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2], scaled when the config asks for it (``RopeScaling``)."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    s = cfg.rope_scaling
    if s is not None and s.rope_type == "linear":
        inv = inv / s.factor
    elif s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x [..., T, heads, H]; positions [..., T]. Hugging Face's rotate-half convention."""
    angles = positions[..., :, None].astype(jnp.float32) * inv_freq  # [..., T, H/2]
    cos = jnp.cos(angles)[..., :, None, :]
    sin = jnp.sin(angles)[..., :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _matmul(x, p, spec: str, out_dtype=None):
    """x [..., D] by a linear's weight: an FP8 GEMM when it is quantised
    (pagedjax/models/fp8.py)."""
    if "weight_scale" in p:
        return fp8.fp8_linear(x, p["weight"], p["weight_scale"], out_dtype)
    return jnp.einsum(spec, x, p["weight"], preferred_element_type=out_dtype)


def _linear(x, p):
    y = _matmul(x, p, "...d,od->...o")
    if "bias" in p:
        y = y + p["bias"]
    return y


def _fused_linear(x, p, sizes):
    """One matmul for a fused projection (weight [R, O, D]), split into its parts [..., R * o]."""
    y = _matmul(x, p, "...d,rod->...ro")
    if "bias" in p:
        y = y + p["bias"]
    return fused.unblock(y, sizes, axis=-1)


def _mlp(x, p):
    if "gate_up_proj" in p:
        rows = p["gate_up_proj"]["weight"].shape[1] // 2
        gate, up = _fused_linear(x, p["gate_up_proj"], (rows, rows))
    else:
        gate, up = _linear(x, p["gate_proj"]), _linear(x, p["up_proj"])
    return _linear(jax.nn.silu(gate) * up, p["down_proj"])


def _qkv(x, p, cfg: ModelConfig, positions, inv_freq):
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if "qkv_proj" in p:
        sizes = fused.qkv_sizes(cfg, p["qkv_proj"]["weight"].shape[0])
        q, kk, v = _fused_linear(x, p["qkv_proj"], sizes)
    else:
        q, kk, v = (_linear(x, p[name]) for name in fused.QKV)
    q = q.reshape(*x.shape[:-1], n, h)
    kk = kk.reshape(*x.shape[:-1], k, h)
    v = v.reshape(*x.shape[:-1], k, h)
    return apply_rope(q, positions, inv_freq), apply_rope(kk, positions, inv_freq), v


def lm_head(params: Params, cfg: ModelConfig, x):
    p = params["model"]["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return _matmul(x, p, "...d,vd->...v", jnp.float32)


def causal_attention(q, k, v, sink_tokens: int = 0, window: int = 0):
    """Full causal attention over whole sequences. q [B, T, N, H]; k, v [B, T, K, H]. With a
    window: only the first ``sink_tokens`` keys and the last ``window`` up to each query
    (pagedjax.kernels.reference.visible)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / np.sqrt(h)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (j <= i) & ((j < sink_tokens) | (j > i - window)) if window else j <= i
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, n, h).astype(q.dtype)


def forward_dense(params: Params, cfg: ModelConfig, tokens: jax.Array, *, sink_tokens: int = 0,
                  window: int | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) for whole sequences tokens [B, T], no cache. window None: the
    model's own sliding window (if its config declares one); 0: full causal attention."""
    window = cfg.sliding_window or 0 if window is None else window
    inv_freq = rope_inv_freq(cfg)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(params["model"]["embed_tokens"]["weight"], tokens, axis=0)
    for layer in params["model"]["layers"]:
        h = rms_norm(x, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
        q, k, v = _qkv(h, layer["self_attn"], cfg, positions, inv_freq)
        o = causal_attention(q, k, v, sink_tokens, window)
        x = x + _linear(o.reshape(*o.shape[:-2], -1), layer["self_attn"]["o_proj"])
        h = rms_norm(x, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        x = x + _mlp(h, layer["mlp"])
    x = rms_norm(x, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    return lm_head(params, cfg, x)


@struct.dataclass
class StepMeta:
    """Where one engine step's tokens go and what they attend to: the attention metadata every
    layer shares. slot_mapping [T]: pool slot of each token's K/V (-1: padding, written nowhere);
    block_tables [S, W]; context_lens [S]: tokens in the cache after this step; query_start_loc
    [S + 1]: each sequence's first token row. ``decode_only`` is static (part of the tree
    structure, not a traced value): every sequence brings one token."""

    slot_mapping: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    query_start_loc: jax.Array
    decode_only: bool = struct.field(pytree_node=False, default=False)


# attend(q [T, N, H], k [T, K, H], v [T, K, H], layer_cache, meta) -> (out [T, N, H], layer_cache)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any, StepMeta], tuple[jax.Array, Any]]


def forward_paged(params: Params, cfg: ModelConfig, tokens, positions, kv_pool, meta: StepMeta,
                  attend: AttendFn, logits_indices):
    """One engine step over a packed ragged batch.

    tokens, positions: [T] int32; kv_pool: a list of per-layer caches, handed to ``attend``
    layer by layer; logits_indices: [S] rows of the batch whose logits are wanted.
    Returns (logits [S, V] float32, new kv_pool).
    """
    inv_freq = rope_inv_freq(cfg)
    x = jnp.take(params["model"]["embed_tokens"]["weight"], tokens, axis=0)
    new_pool = []
    for layer, cache in zip(params["model"]["layers"], kv_pool):
        h = rms_norm(x, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
        attn = layer["self_attn"]
        q, k, v = scale_for_cache(*_qkv(h, attn, cfg, positions, inv_freq), attn)
        o, cache = attend(q, k, v, cache, meta)
        o = unscale_output(o, attn)  # fp8 cache only: static scales, pagedjax/models/kv_scales.py
        new_pool.append(cache)
        x = x + _linear(o.reshape(o.shape[0], -1), layer["self_attn"]["o_proj"])
        h = rms_norm(x, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        x = x + _mlp(h, layer["mlp"])
    x = jnp.take(x, logits_indices, axis=0)
    x = rms_norm(x, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    return lm_head(params, cfg, x), new_pool

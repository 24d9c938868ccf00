"""Static fp8 KV scales (pagedjax/models/kv_scales.py): the bound they come from holds and is
reached, they are powers of two, and applying them leaves the model's logits unchanged in
float32."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.models.decoder import _qkv, rms_norm, rope_inv_freq
from pagedjax.models.fused import qkv_parts
from pagedjax.models.kv_scales import layer_kv_scales, with_kv_scales
from tests.models.paged_step import prefill_one_sequence

E4M3 = 448.0


def _kv_values(cfg, layer, x, positions):
    """K (after RoPE) and V of one layer for hidden states x [T, d]."""
    h = rms_norm(x, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
    _, k, v = _qkv(h, layer["self_attn"], cfg, positions, rope_inv_freq(cfg))
    return np.abs(np.asarray(k, np.float64)), np.abs(np.asarray(v, np.float64))


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_no_k_or_v_value_exceeds_its_scale_and_the_bound_is_reached(model, request):
    """Hidden states pointing along a projection row (g * W[j], the Cauchy-Schwarz equality case)
    and random ones 100x larger: |k| and |v| stay within s * qmax for every head, and the aligned
    inputs come within the power-of-two rounding of it (the bound is tight, not just safe)."""
    m = request.getfixturevalue(model)
    cfg, kh, hd = m.cfg, m.cfg.num_key_value_heads, m.cfg.head_dim
    rng = np.random.default_rng(0)
    for layer in m.params["model"]["layers"]:
        s_k, s_v = (np.asarray(s, np.float64) for s in layer_kv_scales(cfg, layer, E4M3))
        g = np.asarray(layer["input_layernorm"]["weight"], np.float64)
        proj = qkv_parts(cfg, layer["self_attn"])  # the session's engines may have fused it
        rows = {name: np.asarray(proj[name]["weight"], np.float64) for name in ("k_proj", "v_proj")}
        aligned = np.concatenate([sign * rows[n] * g for n in rows for sign in (1, -1)])
        x = np.concatenate([aligned, 100 * rng.standard_normal((64, cfg.hidden_size))])
        pos = jnp.asarray(rng.integers(0, cfg.max_position_embeddings, len(x)), jnp.int32)
        k, v = _kv_values(cfg, layer, jnp.asarray(x, jnp.float32), pos)
        k_max, v_max = k.max(axis=(0, 2)), v.max(axis=(0, 2))  # [K]
        assert np.all(k_max <= s_k * E4M3) and np.all(v_max <= s_v * E4M3)
        # V has no rotation: an aligned input reaches its row's bound; pow2 rounding adds < 2x
        assert np.all(v_max > s_v * E4M3 / 2 / 1.1), (v_max, s_v * E4M3)
        assert np.all(k_max > s_k * E4M3 / 2 / 1.5), (k_max, s_k * E4M3)  # RoPE pairs: looser
        for s in (s_k, s_v):
            assert s.shape == (kh,) and np.all(np.log2(s) == np.round(np.log2(s)))
    assert hd % 2 == 0


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_scaled_model_computes_the_same_logits(model, request):
    """Through a float32 pool, the model with k_scale/v_scale (q * s_k, k / s_k, v / s_v stored,
    output * s_v) gives the logits of the model without, while the pool holds k / s_k and v / s_v:
    the scales change what is stored and nothing else."""
    m = request.getfixturevalue(model)
    cfg = m.cfg
    run = functools.partial(prefill_one_sequence, cfg)

    scaled = with_kv_scales(cfg, m.params, E4M3)
    base_logits, base_pool = run(m.params)
    logits, pool = run(scaled)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-5)
    for layer, (k, v), (k0, v0) in zip(scaled["model"]["layers"], pool, base_pool):
        s_k, s_v = (np.asarray(layer["self_attn"][n])[:, None] for n in ("k_scale", "v_scale"))
        assert not np.all(s_k == 1.0) and not np.all(s_v == 1.0), "scales of 1 prove nothing"
        np.testing.assert_allclose(np.asarray(k), np.asarray(k0) / s_k, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v), np.asarray(v0) / s_v, rtol=1e-5, atol=1e-6)

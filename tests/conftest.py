"""Shared test fixtures: tiny random models and a full-recompute greedy reference."""
from __future__ import annotations

import dataclasses
import functools
import os

# Several fake CPU devices for the tensor-parallel tests; harmless elsewhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import jax.numpy as jnp
import pytest

from pagedjax.models import ModelConfig, forward_dense

TINY_QWEN = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
                        attention_bias=True, tie_word_embeddings=False, eos_token_ids=(1,))
TINY_LLAMA = dataclasses.replace(TINY_QWEN, family="llama", attention_bias=False,
                                 tie_word_embeddings=True, num_attention_heads=8,
                                 num_key_value_heads=2)


@dataclasses.dataclass
class TinyModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None
    dtype: str = "float32"


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """Weights large enough that greedy argmaxes are not near-ties (unlike init-scale noise)."""
    ks = iter(jax.random.split(jax.random.key(seed), 16 * cfg.num_hidden_layers + 8))

    def r(*shape):
        return jax.random.normal(next(ks), shape, jnp.float32) * scale

    d, n, k, h, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.intermediate_size)

    def proj(out, inp, bias):
        return {"weight": r(out, inp), **({"bias": r(out)} if bias else {})}

    layers = [{
        "input_layernorm": {"weight": 1 + 0.1 * r(d)},
        "post_attention_layernorm": {"weight": 1 + 0.1 * r(d)},
        "self_attn": {"q_proj": proj(n * h, d, cfg.attention_bias),
                      "k_proj": proj(k * h, d, cfg.attention_bias),
                      "v_proj": proj(k * h, d, cfg.attention_bias),
                      "o_proj": proj(d, n * h, False)},
        "mlp": {"gate_proj": proj(f, d, False), "up_proj": proj(f, d, False),
                "down_proj": proj(d, f, False)},
    } for _ in range(cfg.num_hidden_layers)]
    params = {"model": {"embed_tokens": {"weight": r(cfg.vocab_size, d)}, "layers": layers,
                        "norm": {"weight": 1 + 0.1 * r(d)}}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"weight": r(cfg.vocab_size, d)}
    return params


@functools.lru_cache(maxsize=None)
def _dense(cfg: ModelConfig, sink_tokens: int = 0, window: int | None = None):
    return jax.jit(lambda p, t: forward_dense(p, cfg, t, sink_tokens=sink_tokens, window=window))


def greedy_reference(model: TinyModel, prompt: list[int], max_tokens: int, pad_to: int = 512,
                     sink_tokens: int = 0, window: int | None = None):
    """Greedy decoding by full recompute of the whole sequence each token (no cache at all).
    Sequences are right-padded to one length: causal attention makes the padding invisible.
    sink_tokens, window: attend with that mask (forward_dense; window None: the model's own)."""
    toks = list(prompt)
    f = _dense(model.cfg, sink_tokens, window)
    width = max(pad_to, len(prompt) + max_tokens)
    for _ in range(max_tokens):
        padded = jnp.zeros((1, width), jnp.int32).at[0, :len(toks)].set(jnp.array(toks))
        toks.append(int(jnp.argmax(f(model.params, padded)[0, len(toks) - 1])))
    return toks[len(prompt):]


@pytest.fixture(scope="session")
def tiny_qwen():
    return TinyModel(TINY_QWEN, random_params(TINY_QWEN, seed=0))


@pytest.fixture(scope="session")
def tiny_llama():
    return TinyModel(TINY_LLAMA, random_params(TINY_LLAMA, seed=1))


def assert_no_leak(llm) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks, f"{bm.num_blocks - bm.num_free} blocks leaked"
    assert not llm.engine.requests, "requests left behind"

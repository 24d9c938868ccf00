"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, with a per-sequence seed.

The random draw for a sequence's i-th output token depends only on (seed, i), so a sequence
samples the same tokens whether it runs alone, in any batch, or after a preemption.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _filtered_sample(logits, temperature, top_p, top_k, min_p, seeds, counters):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # always keeps the top token
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep &= probs >= min_p[:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


MAX_LOGPROBS = 20  # top candidates returned per row: logprobs=k outputs and beam search (2 x width)


def sample(logits, temperature, top_p, top_k, min_p, seeds, counters):
    """logits [S, V] float32; per-row params [S]. Returns tokens [S] int32, their logprobs [S],
    and the top MAX_LOGPROBS (logprobs, ids) [S, MAX_LOGPROBS] per row, all logprobs under the
    unmodified model distribution (vLLM's default)."""
    greedy = jnp.argmax(logits, axis=-1)
    tokens = jax.lax.cond(
        jnp.all(temperature == 0.0),
        lambda: greedy,
        lambda: jnp.where(temperature == 0.0, greedy,
                          _filtered_sample(logits, temperature, top_p, top_k, min_p, seeds, counters)),
    ).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_lp, top_ids.astype(jnp.int32)

"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, with a per-sequence seed.

The random draw for a sequence's i-th output token depends only on (seed, i), so a sequence
samples the same tokens whether it runs alone, in any batch, or after a preemption.

Cost: a step samples S rows over the whole vocabulary (152k for Qwen2.5). Sorting those rows is
the expensive part, so sorting happens only when some row of the step filters (top-p < 1, top-k,
min-p); likewise the top-20 logprobs only when some row asks for them (logprobs=k or a beam).
These are static flags the host sets per step (one small compiled sampler per combination), not
``lax.cond``: a device-side branch makes XLA copy its predicate to the host and wait for it, and
the host could not queue the next step while the device runs this one (async scheduling).
The draw itself is Gumbel-max in vocabulary order with noise from (seed, i), and a filter only
masks tokens, so a row draws the same token whichever of these paths its batch takes. Penalties
and min_tokens (pagedjax.worker.penalties) and prompt logprobs are optional inputs of the step's sampler
program, present only in steps with a row that asks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top candidates returned per row: logprobs=k outputs and beam search (2 x width)


def _keep_mask(scaled, top_p, top_k, min_p):
    """[S, V] bool: the tokens a row may draw after its top-p / top-k / min-p filters. Each
    filter keeps a prefix of the row sorted by logit, so the mask is a threshold on the logit."""
    sorted_logits = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # always keeps the top token
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep &= probs >= min_p[:, None] * probs[:, :1]
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    return scaled >= threshold


def _draw(logits, temperature, top_p, top_k, min_p, seeds, counters, filters: bool):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    keep = True
    if filters:  # static: some row of the step filters; the others keep every token
        row_filters = (top_p < 1.0) | (top_k > 0) | (min_p > 0.0)
        keep = _keep_mask(scaled, top_p, top_k, min_p) | ~row_filters[:, None]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    return jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf), axis=-1)


def sample(logits, temperature, top_p, top_k, min_p, seeds, counters, *, random: bool = True,
           filters: bool = True, top: bool = True, adjusted=None):
    """logits [S, V] float32; per-row params [S]. Static flags, set by the host from the step's
    rows (no device-side branch, so dispatch never waits on the device): ``random`` some row has
    temperature > 0, ``filters`` some such row uses top-p / top-k / min-p, ``top`` some row wants
    its top logprobs. ``adjusted``: the logits after penalties and min_tokens
    (pagedjax.worker.penalties), which the draw uses instead. Returns tokens [S] int32, their logprobs
    [S], and the top MAX_LOGPROBS (logprobs, ids) [S, MAX_LOGPROBS] per row (zeros unless
    ``top``), all logprobs under the unmodified model distribution (vLLM's default)."""
    x = logits if adjusted is None else adjusted
    greedy = jnp.argmax(x, axis=-1)
    if random:
        tokens = jnp.where(temperature == 0.0, greedy,
                           _draw(x, temperature, top_p, top_k, min_p, seeds, counters, filters))
    else:
        tokens = greedy
    tokens = tokens.astype(jnp.int32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    k = min(MAX_LOGPROBS, logits.shape[-1])
    if top:
        top_logits, ids = jax.lax.top_k(logits, k)
        top_lp, top_ids = top_logits - lse[:, None], ids.astype(jnp.int32)
    else:
        top_lp = jnp.zeros((logits.shape[0], k), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], k), jnp.int32)
    return tokens, chosen, top_lp, top_ids


def prompt_logprobs(logits, targets):
    """logits [Q, V] float32 at prompt positions, targets [Q] the prompt token each predicts:
    that token's logprob [Q] and the top MAX_LOGPROBS (logprobs, ids) [Q, MAX_LOGPROBS]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    own = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - lse
    top_logits, ids = jax.lax.top_k(logits, min(MAX_LOGPROBS, logits.shape[-1]))
    return own, top_logits - lse[:, None], ids.astype(jnp.int32)

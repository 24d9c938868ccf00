"""One prefill step of a single sequence through ``forward_paged`` (reference attention, float32
pool of 4 blocks of 16), shared by the model tests that compare two parameter layouts."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.worker import kv_pool
from pagedjax.worker.attention import make_attend
from pagedjax.models import StepMeta, forward_paged


def prefill_one_sequence(cfg, params, t: int = 40, seed: int = 1):
    """(logits [t, V] as numpy, the pool after the step) for ``t`` random tokens."""
    spec = kv_pool.KVPoolSpec.for_model(cfg, 4, 16, "float32")
    meta = StepMeta(slot_mapping=jnp.arange(t, dtype=jnp.int32),
                    block_tables=jnp.arange(4, dtype=jnp.int32)[None],
                    context_lens=jnp.array([t], jnp.int32),
                    query_start_loc=jnp.array([0, t], jnp.int32))
    step = jax.jit(functools.partial(forward_paged, cfg=cfg, meta=meta,
                                     attend=make_attend("reference")))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, t), jnp.int32)
    out, pool = step(params, tokens=tokens, positions=jnp.arange(t, dtype=jnp.int32),
                     kv_pool=kv_pool.allocate(spec), logits_indices=jnp.arange(t, dtype=jnp.int32))
    return np.asarray(out), pool

"""Quantized KV cache on a real model: SmolLM2-135M perplexity of tests/data/paragraph.txt with
fp8_e4m3 and int8 KV within 1% of bf16 KV (issue 10's acceptance line).

The paragraph runs through the engine's paged path (``forward_paged`` with the engine's attention
seam ``make_attend``, reference backend, and the parameters the engine runs with over that pool:
fp8's static scales added): one prefill chunk whose K/V are written into a pool of the cache
dtype and read back from it, so every attention read sees the stored (quantized) K/V, the
chunk's own tokens included. The model runs in float32 so that the cache is the only thing
that changes between the runs; "bf16 KV" is the same float32 model with a bfloat16 pool.
The kernels are held to the reference on the same quantized pages in
tests/kernels/test_quantized_kv.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.loader_testutil import perplexity

from pagedjax.worker import kv_pool
from pagedjax.worker.attention import make_attend
from pagedjax.models import StepMeta, forward_paged

BLOCK = 16


def paged_logits(loaded, ids, kv_dtype: str):
    """Logits of every position of ``ids`` [T] from one paged prefill into a fresh pool."""
    cfg, t = loaded.cfg, len(ids)
    spec = kv_pool.KVPoolSpec.for_model(cfg, -(-t // BLOCK), BLOCK, kv_dtype)
    meta = StepMeta(slot_mapping=jnp.arange(t, dtype=jnp.int32),
                    block_tables=jnp.arange(spec.num_blocks, dtype=jnp.int32)[None],
                    context_lens=jnp.array([t], jnp.int32),
                    query_start_loc=jnp.array([0, t], jnp.int32))
    step = jax.jit(functools.partial(forward_paged, cfg=cfg, meta=meta,
                                     attend=make_attend("reference")))
    logits, _ = step(kv_pool.params_for_pool(spec, cfg, loaded.params), tokens=jnp.asarray(ids, jnp.int32),
                     positions=jnp.arange(t, dtype=jnp.int32), kv_pool=kv_pool.allocate(spec),
                     logits_indices=jnp.arange(t, dtype=jnp.int32))
    return logits


def mean_kl(logits_p, logits_q) -> float:
    """Mean KL(p || q) over positions, nats per token."""
    lp, lq = jax.nn.log_softmax(logits_p, -1), jax.nn.log_softmax(logits_q, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))


@pytest.fixture(scope="module")
def ppl_by_kv_dtype(smollm2, paragraph):
    ids = smollm2.tokenizer(paragraph)["input_ids"]
    logits = {d: paged_logits(smollm2, ids, d)
              for d in ("float32", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8")}
    base = logits["bfloat16"]
    rows = {d: (perplexity(x, ids), mean_kl(base, x)) for d, x in logits.items()}
    print(f"\nSmolLM2-135M perplexity of tests/data/paragraph.txt ({len(ids)} tokens), float32 "
          "model, by KV cache dtype:")
    for d, (ppl, kl) in rows.items():
        print(f"  {d:9s} perplexity {ppl:.4f}  {100 * (ppl / rows['bfloat16'][0] - 1):+.3f}% vs "
              f"bf16 KV  mean KL to bf16 KV {kl:.2e} nats/token")
    return rows


def test_paged_path_matches_the_dense_model(smollm2, paragraph, ppl_by_kv_dtype):
    """The float32 pool gives the dense model's perplexity (test_gguf.py measured 18.53): the
    harness itself adds nothing."""
    assert ppl_by_kv_dtype["float32"][0] == pytest.approx(18.53, rel=2e-3)
    assert ppl_by_kv_dtype["bfloat16"][0] == pytest.approx(ppl_by_kv_dtype["float32"][0],
                                                           rel=1e-3)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "int8"])
def test_quantized_kv_perplexity_within_1pct_of_bf16(kv_dtype, ppl_by_kv_dtype):
    ppl, kl = ppl_by_kv_dtype[kv_dtype]
    bf16 = ppl_by_kv_dtype["bfloat16"][0]
    assert abs(ppl / bf16 - 1) < 0.01, f"{kv_dtype}: perplexity {ppl:.4f} vs bf16 KV {bf16:.4f}"
    # The cache really is quantized (a no-op quantizer would pass the line above trivially):
    # measured 5.0e-3 (e4m3, static scales) and 7.7e-4 (int8, per token) nats/token, against
    # 1e-6 for a float32 pool.
    assert 1e-4 < kl < 1e-2, kl
    assert np.isfinite(ppl)


def test_e5m2_is_reported_and_coarser(ppl_by_kv_dtype):
    """fp8_e5m2 (2 mantissa bits) is not in the 1% acceptance; it must still be a working cache,
    coarser than e4m3 (measured KL 1.9e-2 vs 5.0e-3)."""
    ppl, kl = ppl_by_kv_dtype["fp8_e5m2"]
    assert ppl < 1.05 * ppl_by_kv_dtype["bfloat16"][0]
    assert kl > ppl_by_kv_dtype["fp8_e4m3"][1]

"""The engine's attention seam: write this step's K/V into the pool, then attend over it.

Backends: "reference" (pure jnp, the CPU path), "pallas-gpu" and "pallas-tpu" (kernels in
``pagedjax.kernels``). "auto" picks by platform.
"""
from __future__ import annotations

import jax

from pagedjax.kernels import paged_attention_ref, write_kv_ref


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    platform = jax.devices()[0].platform
    return {"gpu": "pallas-gpu", "tpu": "pallas-tpu"}.get(platform, "reference")


def make_attend(backend: str, interpret: bool = False):
    """attend(q [T,N,H], k [T,K,H], v [T,K,H], (k_pages, v_pages), meta) -> (out, pages)."""
    backend = resolve_backend(backend)
    if backend == "reference":
        attention = paged_attention_ref
    else:
        from pagedjax.kernels.dispatch import ragged_paged_attention

        def attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc):
            return ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens,
                                          query_start_loc, backend=backend, interpret=interpret)

    def attend(q, k, v, pages, meta):
        k_pages, v_pages = write_kv_ref(pages[0], pages[1], k, v, meta["slot_mapping"])
        out = attention(q, k_pages, v_pages, meta["block_tables"], meta["context_lens"],
                        meta["query_start_loc"])
        return out, (k_pages, v_pages)

    return attend

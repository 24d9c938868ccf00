"""The engine's attention seam: write this step's K/V into the pool, then attend over it.

Backends: "reference" (pure jnp, the CPU path), "pallas-gpu" and "pallas-tpu" (kernels in
``pagedjax.kernels``). "auto" picks by platform. A quantized pool (``--kv-cache-dtype``) hands
``QuantizedPages`` through unchanged: the write quantizes, every backend dequantizes on load.
"""
from __future__ import annotations

import jax

from pagedjax.kernels import paged_attention_ref, write_kv_ref
from pagedjax.models import StepMeta


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    platform = jax.devices()[0].platform
    return {"gpu": "pallas-gpu", "tpu": "pallas-tpu"}.get(platform, "reference")


def make_attend(backend: str, interpret: bool = False, mesh=None, sink_tokens: int = 0,
                window: int = 0):
    """attend(q [T,N,H], k [T,K,H], v [T,K,H], (k_pages, v_pages), meta) -> (out, pages); the
    pages are arrays, or QuantizedPages for a quantized cache. sink_tokens, window: the bounded
    mask every backend applies (pagedjax.kernels.reference.visible; window 0: causal).
    With a mesh (tensor parallelism) it runs per device on that device's heads (shard_map)."""
    backend = resolve_backend(backend)
    mask = {"sink_tokens": sink_tokens, "window": window}
    if backend == "reference":
        def attention(*args, decode_only):
            return paged_attention_ref(*args, **mask)
    else:
        from pagedjax.kernels.dispatch import ragged_paged_attention

        def attention(*args, decode_only):
            return ragged_paged_attention(*args, backend=backend, interpret=interpret,
                                          decode_only=decode_only, **mask)

    def attend(q, k, v, pages, meta: StepMeta):
        k_pages, v_pages = write_kv_ref(pages[0], pages[1], k, v, meta.slot_mapping,
                                        num_seqs=meta.block_tables.shape[0])
        out = attention(q, k_pages, v_pages, meta.block_tables, meta.context_lens,
                        meta.query_start_loc, decode_only=meta.decode_only)
        return out, (k_pages, v_pages)

    if mesh is None:
        return attend
    from pagedjax.worker.sharding import shard_attend

    return shard_attend(attend, mesh)

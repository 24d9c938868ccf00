"""int4 decode with K's scale and zero point read once per page (``int4_params`` "page" and
"page_flat", kernels/decode_attention_gpu.py ``load_int4_pages``) against the reference and
against the per-token path ("token"), in interpret mode.

Inputs as in test_int4_kv.py: fresh random draws with fixed integer seeds, keys with per-channel
offsets, pool pages in a random order, table entries past a sequence's blocks far out of range,
a padded sequence with a stale context, contexts 0/1/15/16/17/150 (partial last pages, pages
beyond the context inside a tile). Tiles of several pages (block_kv > block_size), of one page
and of part of a page (block_kv < block_size). With sinks + a window the tiles are not
page-aligned and the kernel keeps the per-token path: still exact, released blocks never read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels.dispatch import ragged_paged_attention
from tests.kernels.seeds import seed_of
from tests.kernels.test_int4_kv import int4_batch
from tests.kernels.test_paged_attention import DECODE
from tests.kernels.test_quantized_kv import check
from tests.kernels.test_window import WINDOWS, _check, decode_seqs, window_batch

PAGE_VARIANTS = ["page", "page_flat"]


def decode(args, **tuning):
    return ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                  **tuning)


# (q dtype, N, K, H, block_size, tuning): pages per tile block_kv / block_size
CASES = [
    pytest.param("bfloat16", 8, 2, 128, 16, {}, id="bf16-gqa4-h128-bs16-4pages"),
    pytest.param("float32", 2, 2, 64, 8, {"num_splits": 3, "block_kv": 32},
                 id="f32-gqa1-h64-bs8-4pages-split3"),
    pytest.param("float32", 7, 1, 64, 16, {"num_splits": 4, "block_kv": 16},
                 id="f32-gqa7-h64-bs16-1page-split4"),
    pytest.param("bfloat16", 7, 1, 64, 32, {"block_kv": 16}, id="bf16-gqa7-h64-bs32-halfpage"),
    pytest.param("float32", 14, 2, 128, 16, {"num_splits": 2, "block_kv": 128},
                 id="f32-gqa7-h128-bs16-8pages-split2"),
]


@pytest.mark.parametrize("variant", PAGE_VARIANTS)
@pytest.mark.parametrize("dtype,n,k,h,bs,tuning", CASES)
def test_page_params_match_reference_and_token_path(dtype, n, k, h, bs, tuning, variant):
    args = int4_batch(seed_of("int4-page", dtype, n, k, h, bs, str(tuning)), DECODE, dtype, n,
                      k, h, bs)
    out = decode(args, int4_params=variant, **tuning)
    check(out, args, dtype)
    # the same dequantized values in the same dots: the per-token path's bits
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                  np.asarray(decode(args, **tuning).astype(jnp.float32)))


@pytest.mark.parametrize("variant", ["token", *PAGE_VARIANTS])
@pytest.mark.parametrize("sink,window,bs", WINDOWS[:3])
def test_page_params_with_sinks_and_window(sink, window, bs, variant):
    seqs = decode_seqs(sink, window, bs)
    args, want = window_batch(seed_of("int4-page-window", sink, window, bs), seqs, 8, 2, 64, bs,
                              sink, window, kv="int4")
    out = decode(args, sink_tokens=sink, window=window, int4_params=variant,
                 num_splits=3, block_kv=16)
    _check(out, want, 1.5e-2)


def _kernel_jaxpr(args, **kw) -> str:
    return str(jax.make_jaxpr(lambda *a: decode(a, **kw))(*args))


def test_page_params_apply_without_a_window_only():
    """The page path is taken where the tiles are page-aligned (its kernel differs from the
    per-token one) and not under a window (the same kernel as "token")."""
    args = int4_batch(1, DECODE, "float32", 4, 2, 64, 16)
    token = _kernel_jaxpr(args)
    page, flat = (_kernel_jaxpr(args, int4_params=v) for v in PAGE_VARIANTS)
    assert len({token, page, flat}) == 3
    window = {"sink_tokens": 4, "window": 32}
    assert (_kernel_jaxpr(args, int4_params="page", **window)
            == _kernel_jaxpr(args, **window))


def test_bad_int4_params_raise():
    args = int4_batch(0, DECODE, "float32", 4, 2, 64, 8)
    with pytest.raises(ValueError, match="int4_params must be one of"):
        decode(args, int4_params="channel")

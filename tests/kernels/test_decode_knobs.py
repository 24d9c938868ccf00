"""The decode kernel's tuning knobs (pagedjax/kernels/decode_attention_gpu.py) against the
reference, in interpret mode on the CPU: any split count (not only powers of two; some splits
empty), ``kv_heads_per_program`` (2 and 4 adjacent KV heads' query heads in one tile) and the
merge's ``merge_chunk`` (its loop of chunks and its one-shot path), alone and combined, on plain and
quantized pages.

Inputs as in test_paged_attention.py: fresh random draws, pool pages in a random order, table
entries past a sequence's blocks far out of range, a padded sequence with a stale context,
padding rows, outputs poisoned (NaN) by interpret mode; context lengths 0/1/15/16/17/150, GQA
1/4/7, head_dim 64/128, bf16 and fp32. At LONG = 150 tokens, block 16, block_kv 16 the table is
176 tokens wide: 3 splits of 64 are all live, 5 splits of 48 leave one empty, 6 of 32 one.
"""
from __future__ import annotations

import pytest

from pagedjax.kernels.dispatch import ragged_paged_attention
from tests.kernels.test_paged_attention import DECODE, check, random_batch
from tests.kernels.test_quantized_kv import check as check_quantized
from tests.kernels.test_quantized_kv import quantized_batch
from tests.kernels.seeds import seed_of

KVP2 = {"kv_heads_per_program": 2}


def splits(n):
    return {"num_splits": n, "block_kv": 16}


# (dtype, N, K, H, block_size, tuning)
PLAIN = [
    pytest.param("float32", 4, 2, 64, 16, KVP2, id="f32-gqa2-h64-kvp2"),
    pytest.param("bfloat16", 8, 2, 128, 16, {**KVP2, **splits(3)}, id="bf16-gqa4-h128-kvp2-split3"),
    pytest.param("bfloat16", 7, 1, 64, 16, splits(3), id="bf16-gqa7-h64-split3"),
    pytest.param("float32", 7, 1, 128, 16, splits(5), id="f32-gqa7-h128-split5"),
    pytest.param("float32", 14, 2, 128, 16, {**KVP2, **splits(6)}, id="f32-gqa7-h128-kvp2-split6"),
    pytest.param("bfloat16", 4, 4, 64, 16, {"kv_heads_per_program": 4, **splits(3)},
                 id="bf16-gqa1-h64-kvp4-split3"),
    pytest.param("bfloat16", 8, 2, 64, 8, splits(2), id="bf16-gqa4-h64-bs8-split2"),
    # the merge's loop of chunks (a chunk smaller than the split count) and its one-shot path
    pytest.param("float32", 7, 1, 64, 16, {**splits(6), "merge_chunk": 2},
                 id="f32-gqa7-h64-split6-merge2"),
    pytest.param("bfloat16", 8, 2, 128, 16, {**splits(5), "merge_chunk": 4},
                 id="bf16-gqa4-h128-split5-merge4"),
    pytest.param("float32", 4, 2, 64, 16, {**splits(3), "merge_chunk": 4},
                 id="f32-gqa2-h64-split3-merge4"),
]
# (kv dtype, q dtype, N, K, H, block_size, tuning)
QUANTIZED = [
    pytest.param("fp8_e4m3", "bfloat16", 14, 2, 128, 16, KVP2, id="e4m3-bf16-gqa7-h128-kvp2"),
    pytest.param("int8", "float32", 8, 2, 64, 16, {**KVP2, **splits(3)},
                 id="int8-f32-gqa4-h64-kvp2-split3"),
    pytest.param("fp8_e5m2", "bfloat16", 4, 4, 128, 16, {"kv_heads_per_program": 4, **splits(5)},
                 id="e5m2-bf16-gqa1-h128-kvp4-split5"),
]


def decode(args, tuning):
    return ragged_paged_attention(*args, backend="pallas-gpu", interpret=True, decode_only=True,
                                  **tuning)


@pytest.mark.parametrize("dtype,n,k,h,bs,tuning", PLAIN)
def test_decode_knobs_match_reference(dtype, n, k, h, bs, tuning):
    args = random_batch(seed_of(dtype, n, k, h, bs, str(tuning)), DECODE, n, k, h, bs,
                        dtype)
    check(decode(args, tuning), args, dtype)


@pytest.mark.parametrize("name,dtype,n,k,h,bs,tuning", QUANTIZED)
def test_decode_knobs_match_reference_quantized(name, dtype, n, k, h, bs, tuning):
    args = quantized_batch(seed_of(name, n, k, h, bs, str(tuning)), DECODE, name, dtype,
                           n, k, h, bs)
    check_quantized(decode(args, tuning), args, dtype)


@pytest.mark.parametrize("tuning", [{**KVP2, **splits(2)}, {**KVP2, **splits(3)}])
def test_decode_knobs_fewer_rows_than_seqs(tuning):
    """T < S: padded sequences' slots own padding rows or none; every row written once."""
    seqs = [(1, 5), (0, 3), (1, 33), (0, 0), (0, 9)]
    args = random_batch(3, seqs, 8, 2, 64, 8, "float32", pad_rows=1)  # T = 3 < S = 5
    check(decode(args, tuning), args, "float32")


@pytest.mark.parametrize("tuning,match", [
    ({"num_splits": 0}, "positive"),
    ({"kv_heads_per_program": 3}, "kv_heads_per_program"),
    ({"kv_heads_per_program": 4}, "kv_heads_per_program"),  # K = 2
    ({"num_splits": 3, "merge_chunk": 3}, "merge_chunk"),
    ({"merge": "fused"}, "merge"),  # unknown knob: the fused merge was measured and removed
])
def test_bad_decode_knobs_raise(tuning, match):
    args = random_batch(0, DECODE, 4, 2, 64, 8, "float32")
    with pytest.raises(ValueError, match=match):
        decode(args, tuning)

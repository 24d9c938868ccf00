"""Sinks + window (StreamingLLM's bounded KV): a query at position i sees key j iff j <= i and
(j < S or j > i - W). Every attention path (the reference, the GPU decode and ragged kernels, the
TPU kernels, interpret mode) against a dense numpy attention with that mask, on fresh random
inputs with fixed integer seeds, pool pages in a random order, and contexts around S, W, S + W
and block boundaries.

The blocks the engine releases (wholly between the sinks and the window of the step's first
query) are pointed at a block full of NaN in the tests: a path that reads one, or lets a zero
probability multiply one, returns NaN. Quantized pages (int8, int4, raw fp8) take the same mask.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import QuantizedPages, dequantize_pages, paged_attention_ref, quantize_pages
from pagedjax.kernels.dispatch import ragged_paged_attention
from pagedjax.kernels.quantization import saturate
from pagedjax.kernels.reference import visible
from tests.kernels.seeds import seed_of


def released(q_len: int, ctx: int, bs: int, sink: int, window: int) -> list[int]:
    """Blocks no query of a step (positions ctx - q_len .. ctx - 1) sees: the engine frees them.
    Window 0 is full attention: none."""
    if window == 0:
        return []
    first = ctx - q_len
    return [b for b in range(-(-ctx // bs)) if b * bs >= sink and (b + 1) * bs <= first - window]


def window_batch(seed, seqs, n, k, h, bs, sink, window, kv="float32", q_dtype="float32"):
    """(args with released blocks pointed at a NaN block, dense expected output [T, N, H]).
    ``seqs``: (q_len, context) per sequence; one padding row after them."""
    rng = np.random.default_rng(seed)
    s = len(seqs)
    w = max(-(-c // bs) for _, c in seqs) + 1
    nb = sum(-(-c // bs) for _, c in seqs) + 3
    poison = 0  # the NaN block (not the last: out-of-range entries clamp to that one)
    perm = 1 + rng.permutation(nb - 1)
    tables = np.full((s, w), 10**6, np.int32)
    at = 0
    for i, (_, c) in enumerate(seqs):
        used = -(-c // bs)
        tables[i, :used] = perm[at:at + used]
        at += used
    q_lens = np.array([ql for ql, _ in seqs])
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qsl[-1]) + 1
    q = rng.standard_normal((t, n, h)).astype(np.float32)
    kp = rng.standard_normal((nb, bs, k, h)).astype(np.float32)
    vp = rng.standard_normal((nb, bs, k, h)).astype(np.float32)
    kp[poison] = vp[poison] = np.nan
    k_pages, v_pages = _pages(jnp.asarray(kp), kv, keys=True), _pages(jnp.asarray(vp), kv)
    q = jnp.asarray(q, q_dtype)
    # expected: dense attention over the pages as stored (dequantized), from the clean tables
    kd = np.asarray(dequantize_pages(k_pages), np.float64)
    vd = np.asarray(dequantize_pages(v_pages), np.float64)
    qd = np.asarray(q.astype(jnp.float32), np.float64)
    want = np.zeros((t, n, h))
    g = n // k
    for i, (ql, c) in enumerate(seqs):
        keys = np.arange(c)
        kk = kd[tables[i, keys // bs], keys % bs]  # [c, K, H]
        vv = vd[tables[i, keys // bs], keys % bs]
        for r in range(ql):
            pos = c - ql + r
            see = np.asarray(visible(keys, pos, sink, window))
            for head in range(n):
                sc = kk[see, head // g] @ qd[qsl[i] + r, head] / np.sqrt(h)
                p = np.exp(sc - sc.max())
                want[qsl[i] + r, head] = p @ vv[see, head // g] / p.sum()
    poisoned = tables.copy()
    for i, (ql, c) in enumerate(seqs):
        if ql:  # a padded sequence's table is never read
            poisoned[i, released(ql, c, bs, sink, window)] = poison
    args = (q, k_pages, v_pages, jnp.asarray(poisoned), jnp.asarray([c for _, c in seqs],
                                                                    jnp.int32), jnp.asarray(qsl))
    return args, want


def _pages(x, kv: str, keys: bool = False):
    if kv in ("float32", "bfloat16"):
        return x.astype(kv)
    if kv == "fp8_e4m3":  # raw fp8 pages: the values as they are (NaN stays NaN)
        return saturate(x, jnp.float8_e4m3fn).astype(jnp.float8_e4m3fn)
    clean = jnp.nan_to_num(x)
    pages = quantize_pages(clean, kv, keys=keys)
    nan_blocks = jnp.isnan(x).any(axis=(1, 2, 3))  # the poisoned block: NaN scales
    scale = jnp.where(nan_blocks[:, None, None, None], jnp.nan, pages.scale.astype(jnp.float32))
    return QuantizedPages(pages.data, scale.astype(pages.scale.dtype))


def _check(out, want, tol):
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert not np.isnan(out).any(), (f"{np.isnan(out).any(axis=(1, 2)).sum()} rows NaN: a "
                                     "released block was read")
    err = np.linalg.norm(out - want) / np.linalg.norm(want)
    assert err < tol, f"relative error {err:.2e} >= {tol}"


# (sink, window, block_size); contexts around S, W, S + W and block boundaries
WINDOWS = [(4, 16, 8), (16, 24, 16), (0, 16, 8), (8, 40, 8)]


def decode_seqs(sink, window, bs):
    lens = sorted({1, max(sink, 1), sink + 1, window, window + 1, sink + window - 1,
                   sink + window, sink + window + 1, sink + window + bs + 1, sink + window + 2 * bs,
                   sink + window + 2 * bs + 1, 3 * bs, 150})
    return [(1, c) for c in lens] + [(0, 70)]


def ragged_seqs(sink, window, bs):
    return [(1, 1), (sink + window + 3, sink + window + 3), (5, sink + window + 2 * bs + 1),
            (0, 60), (2 * bs + 3, 150), (1, sink + window + 1), (bs, 4 * bs)]


BACKENDS = [("reference", False, {}), ("pallas-gpu", True, {}),
            ("pallas-gpu", True, {"num_splits": 3, "block_kv": 16}),
            ("pallas-gpu", False, {"block_m": 16, "block_n": 16}),
            ("pallas-tpu", True, {"pages_per_block": 2}),
            ("pallas-tpu", False, {"block_q": 8, "pages_per_block": 2})]
IDS = ["reference", "gpu-decode", "gpu-decode-split3", "gpu-ragged", "tpu-decode", "tpu-ragged"]


@pytest.mark.parametrize("sink,window,bs", WINDOWS)
@pytest.mark.parametrize("backend,decode,tuning", BACKENDS, ids=IDS)
def test_window_mask(backend, decode, tuning, sink, window, bs):
    seqs = (decode_seqs if decode else ragged_seqs)(sink, window, bs)
    n, k, h = (4, 2, 32)
    args, want = window_batch(seed_of(sink, window, bs, decode), seqs, n, k, h, bs, sink,
                              window)
    out = ragged_paged_attention(*args, backend=backend, interpret=backend != "reference",
                                 decode_only=decode, sink_tokens=sink, window=window, **tuning)
    _check(out, want, 1e-3)


@pytest.mark.parametrize("kv", ["bfloat16", "fp8_e4m3", "int8", "int4"])
@pytest.mark.parametrize("backend,decode,tuning", BACKENDS, ids=IDS)
def test_window_mask_on_quantized_pages(backend, decode, tuning, kv):
    sink, window, bs = WINDOWS[0]
    seqs = (decode_seqs if decode else ragged_seqs)(sink, window, bs)
    q_dtype = "bfloat16" if kv == "bfloat16" or backend == "reference" else "float32"
    args, want = window_batch(seed_of(kv, decode), seqs, 8, 2, 64, bs, sink, window, kv=kv,
                              q_dtype=q_dtype)
    out = ragged_paged_attention(*args, backend=backend, interpret=backend != "reference",
                                 decode_only=decode, sink_tokens=sink, window=window, **tuning)
    _check(out, want, 1.5e-2)


def test_window_off_is_causal_and_the_reference_blockwise_agrees():
    """window 0 is plain causal attention; the reference's chunking (several blocks a chunk,
    chunks straddling the sinks and the window) changes nothing."""
    bs = 8
    seqs = ragged_seqs(4, 16, bs)
    args, want = window_batch(11, seqs, 4, 2, 32, bs, 0, 0)
    _check(paged_attention_ref(*args), want, 1e-4)
    args, want = window_batch(12, seqs, 4, 2, 32, bs, 4, 16)
    for chunk_blocks in (1, 3, 8):
        _check(paged_attention_ref(*args, chunk_blocks=chunk_blocks, sink_tokens=4, window=16),
               want, 1e-4)


def test_a_window_changes_the_output():
    """The mask matters: the same step attended causally differs (the test can fail)."""
    bs = 8
    args, want = window_batch(13, ragged_seqs(4, 16, bs), 4, 2, 32, bs, 4, 16)
    q, kp, vp, tables, *meta = args
    clean = jnp.where(tables == 0, 1, tables)  # no NaN block: attend everything
    causal = np.asarray(paged_attention_ref(q, kp, vp, clean, *meta), np.float64)
    assert np.linalg.norm(causal - want) / np.linalg.norm(want) > 0.05


@pytest.mark.parametrize("sink,window", [(-1, 16), (4, 0), (0, -2)])
def test_bad_window_arguments_raise(sink, window):
    args, _ = window_batch(1, [(1, 5)], 4, 2, 32, 8, 0, 0)
    with pytest.raises(ValueError, match="window"):
        ragged_paged_attention(*args, backend="reference", sink_tokens=sink, window=window)

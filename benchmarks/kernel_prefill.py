"""The prefill part of ``python -m benchmarks kernel``: causal prefill at ``--prefill-tokens``
and a chunk over paged context (a quarter of the tokens over the rest), our kernels (dispatch's
choice, then Triton tiles) against cuDNN flash attention on the same problem, in one run."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.kernels import paged_attention_ref
from pagedjax.kernels.dispatch import ragged_paged_attention

from .common import as_f32, rel_err

# {}: no knobs, dispatch's choice (the Mosaic GPU kernel for one sequence on Hopper, else Triton
# with its defaults); the rest tune the Triton kernel.
PREFILL_TILES = [dict(),
                 dict(block_m=128, block_n=128, num_warps=8, num_stages=3),  # Triton's default
                 dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
                 dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
                 dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
                 dict(block_m=128, block_n=32, num_warps=4, num_stages=4)]


def prefill(b, mm_flops: float, sweep: bool) -> tuple[list[dict], dict]:
    n, k, h, bs = b.n, b.k, b.h, b.bs
    t_all = b.prefill_t
    w = t_all // bs
    kp, vp = b.rand((w + 1, bs, k, h)), b.rand((w + 1, bs, k, h))
    table = jnp.asarray(np.random.default_rng(1).permutation(w), jnp.int32)[None]
    rows, best = [], {}
    chunk = t_all // 4
    cases = [("causal", t_all, 0), ("chunk", chunk, t_all - chunk)]  # (name, q_len, paged ctx)
    q_all = b.rand((t_all, n, h))
    outs = {}
    for name, q_len, ctx0 in cases:
        q = q_all[t_all - q_len:]
        cl, qsl = jnp.array([q_len + ctx0], jnp.int32), jnp.array([0, q_len], jnp.int32)
        flops = 4 * n * h * (q_len * ctx0 + q_len * (q_len + 1) / 2)
        tiles = PREFILL_TILES if (sweep and not b.tiny) else PREFILL_TILES[:2]
        for tile in tiles:
            if b.tiny:
                tile = dict(tile, block_m=32, block_n=16)
            step = functools.partial(_ragged_step, b=b, cl=cl, qsl=qsl, tile=tile)
            try:
                t = b.timed(step, q, (kp, vp, table), 1, flops / 400e12)
            except Exception as e:  # noqa: BLE001
                rows.append({"case": name, "tile": str(tile), "error": str(e)[:200]})
                continue
            rows.append({"case": name, "q_len": q_len, "ctx": q_len + ctx0, "tile": str(tile),
                         "us": t * 1e6, "TFLOPs": flops / t / 1e12,
                         "pct_matmul": 100 * flops / t / mm_flops})
            if name not in best or t < best[name]["t"]:
                best[name] = {"t": t, "tile": tile, "flops": flops}
        out = b.one_call(lambda: ragged_paged_attention(q, kp, vp, table, cl, qsl,
                                                        backend=b.backend, interpret=b.interpret,
                                                        **best[name]["tile"]))
        small = slice(None) if b.tiny else slice(q_len - 64, q_len)  # the longest rows
        ref = paged_attention_ref(*as_f32(q[small], kp, vp), table, cl,
                                  jnp.array([0, out[small].shape[0]], jnp.int32))
        best[name]["rel_err_vs_ref"] = rel_err(out[small], ref)
        outs[name] = out
    # cuDNN flash attention on the same causal problem, contiguous K/V (its best case)
    q = q_all[None]
    kc = kp[table[0]].reshape(1, t_all, k, h)
    vc = vp[table[0]].reshape(1, t_all, k, h)
    impl = None if b.tiny else "cudnn"
    flops = 4 * n * h * t_all * (t_all + 1) / 2
    try:
        t = b.timed(lambda x, c: jax.nn.dot_product_attention(x, c[0], c[1], is_causal=True,
                                                              implementation=impl),
                    q, (kc, vc), 1, flops / 500e12)
        cudnn = {"us": t * 1e6, "TFLOPs": flops / t / 1e12,
                 "pct_matmul": 100 * flops / t / mm_flops,
                 "implementation": impl or "xla"}
        ref_out = b.one_call(lambda: jax.nn.dot_product_attention(q, kc, vc, is_causal=True,
                                                                  implementation=impl))
        cudnn["rel_diff_ours_vs_cudnn"] = rel_err(outs["causal"], ref_out[0])
    except Exception as e:  # noqa: BLE001
        cudnn = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows.append({"case": "cudnn-causal", "q_len": t_all, "ctx": t_all, **cudnn})
    summary = {name: {"us": v["t"] * 1e6, "TFLOPs": v["flops"] / v["t"] / 1e12,
                      "tile": str(v["tile"]), "rel_err_vs_ref": v["rel_err_vs_ref"]}
               for name, v in best.items()}
    summary["cudnn"] = cudnn
    return rows, summary


def _ragged_step(x, c, *, b, cl, qsl, tile):
    return ragged_paged_attention(x, c[0], c[1], c[2], cl, qsl, backend=b.backend,
                                  interpret=b.interpret, **tile)

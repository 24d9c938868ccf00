"""The fp8 GEMV experiment (benchmarks/experiments/fp8_gemv.py; the engine does not call it) in
Pallas interpret mode against a numpy float64 reference of the same arithmetic on fresh random
inputs: 1, 3 and 8 rows, channel and feature counts that are not tile multiples (the masked
edges), one and several D splits; the errors bad input gets; its lowering to Triton IR for CUDA;
and the bench's --tiny run and the record it writes."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from benchmarks.experiments import fp8_gemv_bench
from benchmarks.experiments.fp8_gemv import default_split_d, fp8_gemv
from pagedjax.models import fp8
from tests.kernels.seeds import seed_of

# (T, O, D, block_o, block_d, split_d)
CASES = [
    (1, 40, 200, 16, 64, 1),  # both ragged: the last channel tile masked, the D tail peeled
    (3, 40, 200, 16, 64, 3),  # 4 D tiles over 3 splits; the tail in the last one
    (8, 37, 100, 8, 32, 2),
    (3, 48, 256, 16, 64, 4),  # tile multiples: no mask at all, one D tile a split
    (1, 24, 520, 8, 128, None),  # the default split
]


def _inputs(t, o, d, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, d)) * rng.lognormal(0, 1, (t, 1))).astype(ml_dtypes.bfloat16)
    # e4m3 codes over their whole range and scales spread across channels, as quantised weights
    w = np.clip(rng.standard_normal((o, d)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    s = rng.lognormal(-8, 1, o).astype(np.float32)
    return x, w, s


def _ref(x, w, s):
    return (x.astype(np.float64) @ w.astype(np.float64).T) * s.astype(np.float64)


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(case):
    t, o, d, bo, bd, split = case
    x, w, s = _inputs(t, o, d, seed_of(*case))
    y = fp8_gemv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), block_o=bo, block_d=bd,
                 split_d=split, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (t, o) and y.dtype == jnp.float32
    ref = _ref(x, w, s)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-3, atol=1e-6 * np.abs(ref).max())


def test_output_in_x_dtype_is_the_float32_result_rounded():
    x, w, s = (jnp.asarray(a) for a in _inputs(3, 40, 200, seed_of("bf16")))
    kw = dict(block_o=16, block_d=64, split_d=2, interpret=True)
    y = fp8_gemv(x, w, s, **kw)
    assert y.dtype == jnp.bfloat16
    y32 = np.asarray(fp8_gemv(x, w, s, out_dtype=jnp.float32, **kw))
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y32, rtol=2 ** -8)


def test_default_split_fills_the_gpu_only_when_the_channels_do_not():
    assert default_split_d(3584, 18944, 16, 512, 132) > 1  # down_proj: 224 channel tiles
    assert default_split_d(37888, 3584, 16, 512, 132) == 1  # gate/up: 2,368 already
    assert default_split_d(64, 64, 16, 32, 132) == 1  # 2 D tiles: too short to split


def test_bad_input_is_refused_by_name():
    x, w, s = (jnp.asarray(a) for a in _inputs(2, 32, 64, 0))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        fp8_gemv(jnp.zeros((9, 64), jnp.bfloat16), w, s, interpret=True)
    with pytest.raises(ValueError, match="60 features but the weight takes 64"):
        fp8_gemv(x[:, :60], w, s, interpret=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemv(x, w.astype(jnp.bfloat16), s, interpret=True)
    with pytest.raises(ValueError, match="block_o must be a power of two"):
        fp8_gemv(x, w, s, block_o=24, interpret=True)
    with pytest.raises(ValueError, match="split_d must be 1 to 2"):
        fp8_gemv(x, w, s, block_d=32, split_d=3, interpret=True)
    with pytest.raises(ValueError, match=r"scale \[O\]"):
        fp8_gemv(x, w, s[:-1], interpret=True)


@pytest.mark.parametrize("t,o,d,split", [(1, 3584, 18944, 4), (8, 200, 600, 2),
                                         (1, 37888, 3584, 1)])
def test_lowers_to_triton_for_cuda(t, o, d, split):
    """The real lowering (Pallas -> Triton IR), checked on the CPU at Qwen2.5-7B's shapes and a
    ragged one: catches an op interpret mode has and the Triton lowering lacks."""
    sd = jax.ShapeDtypeStruct
    fn = jax.jit(functools.partial(fp8_gemv, split_d=split))
    args = (sd((t, d), jnp.bfloat16), sd((o, d), jnp.float8_e4m3fn), sd((o,), jnp.float32))
    assert "fp8_gemv" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_bench_tiny_writes_its_record(tmp_path):
    summary = fp8_gemv_bench.main(["--out", str(tmp_path), "--tiny"])
    record = json.loads((tmp_path / "fp8-gemv.json").read_text())
    assert record["scenario"] == "fp8-gemv"
    assert record["command"].startswith("python -m benchmarks.experiments.fp8_gemv_bench")
    s, f = record["summary"], record["figures"]
    assert s == json.loads(json.dumps(summary))
    assert s["copy_GBps"] > 0 and s["variants_failed"] == 0
    # sum over shapes x 28 layers of (XLA - best GEMV), recomputed from the rows
    rows = f["rows"]
    us = {(r["matmul"], r["T"], r["variant"]): r["us"] for r in rows}
    expect = sum(28 * (us[(m, 1, "xla_w8a16")]
                       - min(v for (mm, t, n), v in us.items()
                             if mm == m and t == 1 and n.startswith("gemv"))) / 1e3
                 for m in {r["matmul"] for r in rows})
    assert s["saved_ms_per_token"] == pytest.approx(expect)
    assert set(s["best"]["tiny"]) >= {"variant", "us", "GBps", "pct_copy", "xla_us",
                                      "xla_pct_copy", "speedup_vs_xla"}
    variants = {(r["T"], r["variant"]) for r in rows}
    # every T has the baselines and the default GEMV; the sweep ran its one variant at each T
    for t in f["tokens"]:
        assert {(t, "xla_w8a16"), (t, "bf16"), (t, "gemv"), (t, "gemv_o8_d32_s1_w4")} <= variants
    for r in rows:
        assert r["GBps"] > 0 and r["pct_copy"] > 0 and r["rel_err"] <= fp8_gemv_bench.CHECK_TOL


@pytest.mark.parametrize("name,o,d", fp8_gemv_bench.SHAPES)
def test_sweep_grid_is_distinct_valid_and_most_promising_first(name, o, d):
    case = fp8_gemv_bench.Case(name, o, d, [], [], None, None)
    default = fp8_gemv_bench.resolve(dict(block_o=16, block_d=512, split_d=None, num_warps=4),
                                     o, d, 132)
    grid = fp8_gemv_bench.sweep_grid(case, fp8_gemv_bench.GRID, default, 132)
    keys = [tuple(k.values()) for k in grid]
    assert len(keys) == len(set(keys)) and tuple(default.values()) not in keys
    assert all(1 <= k["split_d"] <= -(-d // k["block_d"]) for k in grid)
    starved = [-(-o // k["block_o"]) * k["split_d"] < 132 for k in grid]
    assert starved == sorted(starved)  # variants that cannot fill the SMs come last


def test_sweep_past_its_deadline_counts_what_it_skipped():
    case = fp8_gemv_bench.Case("m", 8, 8, [], [], None, None)
    queue = [(case, 1, {}), (case, 1, {}), (case, 4, {})]
    skipped = {}
    fp8_gemv_bench.run_queue(None, queue, deadline=0.0, skipped=skipped)  # runs nothing
    assert skipped == {"m/T1": 2, "m/T4": 1}


def test_timing_loop_runs_every_call_it_counts():
    """Each of the u x r calls an iteration counts stays in the compiled loop: repeated calls on
    one weight are not merged (session 12's H100 figures were a u-th of the calls timed)."""
    r, u = 2, 3
    case = fp8_gemv_bench.make_case("t", 40, 200, 1, r, jax.random.key(seed_of("loop")))
    fn = fp8.fp8_linear
    out = jax.eval_shape(fn, case.x, case.wq[0], case.ws[0])
    carry = (case.x, tuple(jnp.zeros(out.shape, out.dtype) for _ in range(r)),
             tuple(case.wq), tuple(case.ws))
    hlo = fp8_gemv_bench.chained_loop(fn, r, u, 2).lower(carry).compile().as_text()
    assert hlo.count(" dot(") == u * r

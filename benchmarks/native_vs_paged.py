"""native-vs-paged: transformers generate vs pagedjax in one memory budget (sad path vs happy path).

On one GPU, in one run, under one simulated card (``--budget-gib``, 24 GiB by default: torch gets
``set_per_process_memory_fraction``, JAX gets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` and sizes its pool
with ``--gpu-memory-utilization`` inside it), the same model shape (Qwen2.5-7B by default, random
weights, bf16, greedy, EOS ignored):

  (a) one 10,000-token prompt + 2,000 new tokens: does it complete, peak memory, memory over time;
  (b) 8K-context requests (8,064 prompt + 128 new): the largest batch transformers completes
      (doubling, then bisecting) vs the requests pagedjax runs at once in its pool, vs a JAX
      contiguous cache reserving ``--max-model-len`` (32,768) tokens per sequence, counted in the
      same KV budget (and, as an upper bound, allocated until the device refuses): the
      over-reservation cost, separate from any framework overhead;
  (c) batch 128 x 512-token prompts + 256 new tokens: output tok/s. If transformers OOMs inside
      the budget it runs (c) again with the whole GPU, and the speedup is taken against that.

Each side runs in its own process (``benchmarks/native_hf.py``, ``benchmarks/native_jax.py``), so
torch's and JAX's allocators never hold memory at the same time. Summary: ``case_a_completed``
(pagedjax), ``concurrency_ratio_8k`` (pagedjax's 8K requests at once / contiguous sequences),
``speedup_vs_hf_b128``, ``compilations_after_warmup``. On a machine without a GPU both sides run
on the CPU with no budget (use ``--tiny --quick``), which checks the plumbing, not the memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness, plots
from benchmarks.common import print_table, results_dir, write_result

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
FULL = {"a_prompt_len": 10_000, "a_new_tokens": 2_000, "b_context": 8192, "b_new_tokens": 128,
        "b_max_batch": 64, "c_batch": 128, "c_prompt_len": 512, "c_new_tokens": 256}
QUICK = {"a_prompt_len": 40, "a_new_tokens": 8, "b_context": 64, "b_new_tokens": 4,
         "b_max_batch": 8, "c_batch": 4, "c_prompt_len": 16, "c_new_tokens": 8}
COLUMNS = ["case", "system", "status", "requests", "prompt_len", "new_tokens", "output_tok_s",
           "peak_gib", "note"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    harness.add_engine_arguments(p)
    p.add_argument("--budget-gib", type=float, default=24.0, help="the simulated card (GPU only)")
    p.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--hf-max-time-a", type=float, default=None,
                   help="stop transformers' case (a) after this many seconds (it runs ~11 tok/s)")
    for name, value in FULL.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {value} (--quick {QUICK[name]})")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--skip-hf", action="store_true", help="pagedjax side only")
    p.add_argument("--hf-timeout", type=float, default=None, help="seconds for the torch process")
    p.add_argument("--paged-timeout", type=float, default=None, help="seconds for the JAX process")


def gpu_total_bytes() -> int | None:
    """GPU 0's memory from nvidia-smi (the parent must not start a CUDA backend itself)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        return int(float(out.stdout.strip().splitlines()[0])) << 20 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _child(module: str, spec: dict, env: dict, timeout: float | None, tmp: Path) -> dict:
    spec_path, result_path = tmp / f"{module}.spec.json", tmp / f"{module}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**env, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    log_path = tmp / f"{module}.stderr.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", str(spec_path),
                                 str(result_path)], env=env, cwd=ROOT, timeout=timeout,
                                stderr=log).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"cases": {}}
    result.update(exit=rc, wall_s=time.perf_counter() - t0)
    if rc != 0:
        # the child's last words go into the JSON: a device run's log may be cut
        result["stderr_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
        logger.warning("%s exited with %s after %.0f s; keeping what it wrote. Its stderr "
                       "ended:\n%s", module, rc, result["wall_s"],
                       "\n".join(result["stderr_tail"][-15:]))
    return result


class Children:
    """What both sides' processes get, shared with ``small-memory``: the simulated card (JAX's
    share of the GPU in its environment, torch's budget in its spec) and how to load the model."""

    def __init__(self, args):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the parent writes JSON
        self.total = gpu_total_bytes()
        self.budget = int(args.budget_gib * GiB) if self.total else None
        self.load = {k: getattr(args, k) for k in (
            "model", "tiny", "load_format", "dtype", "tokenizer", "seed", "quantization",
            "tensor_parallel_size")}
        self.hf_dtype = {"auto": "bfloat16" if self.total else "float32"}.get(args.dtype,
                                                                               args.dtype)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
        self.jax_env = dict(self.env)
        if self.total:
            fraction = min(self.budget / self.total, 1)
            self.jax_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
        self.seed, self.hf_config = args.seed, harness.hf_config_dict(args)

    def paged(self, engine: dict, cases: dict, timeout, tmp: Path) -> dict:
        return _child("native_jax", {"load": self.load, "engine": engine, "cases": cases},
                      self.jax_env, timeout, tmp)

    def hf(self, cases: dict, attn: str, max_time_a, timeout, tmp: Path) -> dict:
        spec = {"hf_config": self.hf_config, "hf_dtype": self.hf_dtype, "hf_attn": attn,
                "budget_bytes": self.budget, "hf_max_time_a": max_time_a, "seed": self.seed,
                "cases": cases}
        return _child("native_hf", spec, self.env, timeout, tmp)


def run(args) -> dict:
    harness.preset(args, FULL, QUICK, args.quick)
    ch = Children(args)
    budget, total, hf_dtype = ch.budget, ch.total, ch.hf_dtype
    cases = {"a": {"prompt_len": args.a_prompt_len, "new_tokens": args.a_new_tokens},
             "b": {"context": args.b_context, "new_tokens": args.b_new_tokens,
                   "max_batch": args.b_max_batch},
             "c": {"batch": args.c_batch, "prompt_len": args.c_prompt_len,
                   "new_tokens": args.c_new_tokens}}
    with tempfile.TemporaryDirectory(prefix="native-vs-paged-") as tmp:
        paged = ch.paged(dataclasses.asdict(harness.engine_args(args)), cases, args.paged_timeout,
                         Path(tmp))
        hf = {"skipped": True, "cases": {}}
        _write(args, budget, total, cases, paged, hf, hf_dtype)
        if not args.skip_hf:
            hf = ch.hf(cases, args.hf_attn, args.hf_max_time_a, args.hf_timeout, Path(tmp))
    summary, rows = _write(args, budget, total, cases, paged, hf, hf_dtype)
    print_table(rows, COLUMNS)
    print("  ".join(f"{k}={v if not isinstance(v, float) else round(v, 2)}"
                    for k, v in summary.items()))
    _plot(results_dir(args.out) / "native-vs-paged.png", paged, hf, budget, args)
    return summary


def _hf_c(hf: dict) -> tuple[dict | None, str]:
    for key, where in (("c", "in the budget"), ("c_whole_gpu", "with the whole GPU")):
        c = hf["cases"].get(key)
        if c and c.get("status") == "completed":
            return c, where
    return None, ""


def _summary(paged: dict, hf: dict) -> dict:
    pc, cont = paged["cases"], paged.get("contiguous") or {}
    a, b, c = pc.get("a", {}), pc.get("b", {}), pc.get("c", {})
    contiguous = cont.get("seqs_in_same_budget")
    hf_c, hf_c_where = _hf_c(hf)
    hb = hf["cases"].get("b") or {}
    return {
        "case_a_completed": a.get("status") == "completed",
        "concurrency_ratio_8k": (b["max_running"] / contiguous
                                 if b.get("status") == "completed" and contiguous else None),
        "speedup_vs_hf_b128": (c["output_tok_s"] / hf_c["output_tok_s"]
                               if hf_c and c.get("status") == "completed" else None),
        "compilations_after_warmup": sum(x.get("compilations", 0) for x in pc.values()),
        "precompile_s": paged.get("precompile_s"),
        "paged_8k_concurrent": b.get("max_running"),
        "contiguous_seqs_same_budget": contiguous,
        "contiguous_seqs_allocatable": cont.get("seqs_allocatable"),
        "hf_8k_max_batch": hb.get("max_batch"),
        "hf_case_a_status": (hf["cases"].get("a") or {}).get("status"),
        "paged_c_output_tok_s": c.get("output_tok_s"),
        "hf_c_output_tok_s": hf_c["output_tok_s"] if hf_c else None,
        "hf_c_memory": hf_c_where or None,
        "kv_pool_tokens": (paged.get("pool") or {}).get("tokens"),
    }


def _gib(x) -> float | None:
    return None if x is None else x / GiB


def _rows(paged: dict, hf: dict, cases: dict) -> list[dict]:
    rows = []
    pc, hc = paged["cases"], hf["cases"]
    for name in ("a", "b", "c", "c_whole_gpu"):
        h = hc.get(name)
        if name == "b" and h:
            best = h.get("best") or {}
            rows.append({"case": "b", "system": "transformers", "status":
                         f"max batch {h['max_batch']}" + (" (cap)" if h.get("capped") else ""),
                         "requests": h["max_batch"], "prompt_len": h["context"] - h["new_tokens"],
                         "new_tokens": h["new_tokens"], "output_tok_s": best.get("output_tok_s"),
                         "peak_gib": _gib(best.get("peak_allocated_bytes")),
                         "note": (f"no failure up to {h['max_batch']}" if h.get("capped") else
                                  f"batch {h['first_failure']}: {h['failure_status']}")})
        elif h:
            rows.append({"case": name, "system": "transformers", "status": h["status"],
                         "requests": h["batch"], "prompt_len": h["prompt_len"],
                         "new_tokens": h.get("new_tokens", h.get("generated_before_end")),
                         "output_tok_s": h.get("output_tok_s"),
                         "peak_gib": _gib(h.get("peak_allocated_bytes")),
                         "note": ("whole GPU" if name == "c_whole_gpu"
                                  else (h.get("error") or "")[:60])})
        p = pc.get(name)
        if p:
            rows.append({"case": name, "system": "pagedjax", "status": p["status"],
                         "requests": p["requests"], "prompt_len": p["prompt_len"],
                         "new_tokens": p["new_tokens_requested"],
                         "output_tok_s": p.get("output_tok_s"),
                         "peak_gib": _gib(p.get("peak_bytes_in_use")),
                         "note": (f"{p.get('max_running')} at once, "
                                  f"{p.get('compilations')} compilations")})
    cont = paged.get("contiguous")
    if cont:
        rows.append({"case": "b", "system": f"JAX contiguous ({cont['reserve_len']}/seq)",
                     "status": f"{cont['seqs_in_same_budget']} fit", "requests":
                     cont["seqs_in_same_budget"], "prompt_len": cases["b"]["context"]
                     - cases["b"]["new_tokens"], "new_tokens": cases["b"]["new_tokens"],
                     "note": ("allocation not measured on the CPU"
                              if cont.get("seqs_allocatable") is None else
                              f"{cont['seqs_allocatable']} allocatable with no headroom")})
    return rows


def _write(args, budget, total, cases, paged, hf, hf_dtype):
    summary, rows = _summary(paged, hf), _rows(paged, hf, cases)
    figures = {"budget_bytes": budget, "device_total_bytes": total, "cases": cases,
               "model": "tiny-qwen2" if args.tiny else args.model, "hf_dtype": hf_dtype,
               "hf_attn": args.hf_attn, "gpu_memory_utilization": args.gpu_memory_utilization,
               "paged": paged, "transformers": hf, "table": {"columns": COLUMNS, "rows": rows}}
    write_result("native-vs-paged", summary, figures, out=args.out)
    return summary, rows


def _plot(path, paged, hf, budget, args) -> None:
    series = {}
    ha, pa = hf["cases"].get("a") or {}, paged["cases"].get("a") or {}
    if any(p.get("bytes") for p in ha.get("timeline", [])):
        series[f"transformers ({ha['status']})"] = (
            [p["t"] for p in ha["timeline"]], [p["bytes"] / GiB for p in ha["timeline"]])
    pts = [s for s in pa.get("timeline", []) if "bytes_in_use" in s]
    if pts:
        series[f"pagedjax ({pa['status']})"] = ([s["t"] for s in pts],
                                                 [s["bytes_in_use"] / GiB for s in pts])
    s = _summary(paged, hf)
    reserve = (paged.get("contiguous") or {}).get("reserve_len", "max_model_len")
    panels = [
        {"kind": "lines", "title": f"(a) device memory in use, {args.a_prompt_len} prompt + "
                                   f"{args.a_new_tokens} new", "xlabel": "s",
         "ylabel": "GiB", "series": series,
         "hlines": {f"budget {args.budget_gib:g} GiB": budget / GiB if budget else None}}
        if series else None,
        {"kind": "bars", "title": f"(b) {args.b_context}-token requests at once",
         "ylabel": "requests",
         "labels": [f"contiguous\n{reserve}/seq reserved", "transformers", "pagedjax"],
         "values": [s["contiguous_seqs_same_budget"], s["hf_8k_max_batch"],
                    s["paged_8k_concurrent"]]},
        {"kind": "bars", "title": f"(c) {args.c_batch} x {args.c_prompt_len} + "
                                  f"{args.c_new_tokens}: output tok/s", "ylabel": "tok/s",
         "labels": [f"transformers\n{s['hf_c_memory'] or ''}", "pagedjax"],
         "values": [s["hf_c_output_tok_s"], s["paged_c_output_tok_s"]]},
    ]
    plots.save(path, panels, title=f"native vs paged, {args.budget_gib:g} GiB budget"
               if budget else "native vs paged (CPU, no budget)")

"""The human tables of ``pagedjax plan`` (``--json`` prints the report dict as it is)."""
from __future__ import annotations

from pagedjax.worker.kv_pool import GiB


def _gib(b) -> str:
    return f"{b / GiB:.2f}"


def render(r: dict) -> str:
    """The human tables."""
    m = r["model"]
    out = [f"{m['name'] or m['source']}  ({m['kind']}: {m['source']})",
           f"  {m['family']}, {m['params'] / 1e9:.2f} B params, {m['layers']} layers, "
           f"{m['attention_heads']} query / {m['kv_heads']} KV heads x {m['head_dim']}, vocab "
           f"{m['vocab_size']:,}, max {m['max_position_embeddings']:,} positions",
           f"  dtype {r['dtype']}{', fp8 linears' if r['quantization'] else ''}, KV cache "
           f"{r['kv_cache_dtype']}, block size {r['block_size']}, "
           f"tensor parallel {r['tensor_parallel_size']} ({r['kv_heads_per_device']} KV heads "
           f"per device{', replicated' if r['kv_heads_replicated'] else ''})", ""]
    mem = r["memory"]
    if mem is None:
        out += [f"weights per device       {_gib(r['weights_bytes_per_device']):>8} GiB",
                f"profiling peak (est.)    {_gib(r['profile_peak_bytes_estimate']):>8} GiB"]
    else:
        rows = []
        if mem["device_memory_gib"] is not None:
            rows += [("device memory", mem["device_memory_gib"]),
                     (f"usable (x {mem['gpu_memory_utilization']})",
                      mem["device_memory_gib"] * mem["gpu_memory_utilization"])]
        rows += [("weights", mem["weights_gib"]),
                 (f"profiling peak ({mem['profile_peak_source']})", mem["profile_peak_gib"]),
                 (f"KV pool ({mem['kv_budget_source']})", mem["kv_pool_gib"])]
        if mem["free_gib"] is not None:
            rows.append(("free", mem["free_gib"]))
        out.append("memory per device                          GiB")
        out += [f"  {name:<38}{v:>8.2f}" for name, v in rows]
    kv = r["kv_bytes_per_token"]
    out += ["", f"KV cache: {kv:,} B per token ({kv / 1024:.1f} KiB) per device, "
                f"{r['block_bytes']:,} B per block of {r['block_size']}"]
    if mem is not None:
        out.append(f"KV pool: {mem['num_blocks']:,} blocks x {mem['block_size']} = "
                   f"{mem['num_tokens']:,} tokens")
    out += ["", "max_model_len      KV/seq GiB   blocks/seq   max concurrency"]
    for row in r["concurrency"]:
        conc = "-" if row["max_concurrency"] is None else (
            f"{row['max_concurrency']:,} ({row['concurrency_ratio']:.2f}x)")
        tag = " (model max)" if row["model_max"] else ""
        out.append(f"  {row['max_model_len']:>7,}{tag:<12}{_gib(row['kv_bytes_per_seq']):>8}"
                   f"{row['blocks_per_seq']:>13,}   {conc}")
    t = r["target"]
    if t:
        out += ["", f"smallest device memory for {t['concurrency']} x {t['max_model_len']:,}-token "
                    f"sequences: {t['min_device_memory_gib']:.2f} GiB per device "
                    f"(at --gpu-memory-utilization {t['gpu_memory_utilization']})"]
    h = r.get("host_tier")
    if h:
        ratio = "" if h["gpu_pool_ratio"] is None else f", {h['gpu_pool_ratio']:.1f}x the KV pool"
        out += ["", f"host KV tier: {h['blocks']:,} blocks x {r['block_size']} = {h['tokens']:,} "
                    f"tokens{ratio} ({_gib(h['host_bytes'])} GiB of host memory; --swap-space "
                    f"{h['swap_space_gib']:g} + --kv-offloading-size "
                    f"{h['kv_offloading_size_gib']:g} GiB, one pool: prefix blocks evicted from "
                    "the GPU come back from it)"]
    if r["requests"]:
        out += ["", *_render_requests(r["requests"])]
    out += ["", *(f"note: {n}" for n in r["notes"])]
    return "\n".join(out)


def _render_requests(q: dict) -> list[str]:
    p = q["prompt_tokens"]
    out = [f"request log {q['log']}: {q['requests']:,} prompts"
           + (f", {len(q['malformed_lines'])} malformed line"
              f"{'s' if len(q['malformed_lines']) > 1 else ''}" if q["malformed_lines"] else ""),
           f"  prompt tokens  P50 {p['p50']:,}  P95 {p['p95']:,}  P99 {p['p99']:,}  "
           f"max {p['max']:,}  mean {p['mean']:.1f}",
           f"  recommended --max-model-len {q['recommended_max_model_len']:,} "
           f"(P99 prompt + --max-tokens {q['max_tokens']}, rounded up to the block size"
           + (", capped at the model's maximum)" if q["capped_at_model_max"] else ")"),
           f"  rejects {q['rejected']:,} of {q['requests']:,} prompts "
           f"({100 * q['rejected_share']:.1f}%: prompt + max_tokens > max_model_len)"]
    if q["max_concurrency"] is not None:
        out.append(f"  max concurrency {q['max_concurrency']:,} at that length "
                   f"(vs {q['max_concurrency_at_model_max']:,} at the model's maximum)")
    a = q["requested_max_tokens"]
    if a:
        out.append(f"  max_tokens asked by {a['requests']:,} requests: P50 {a['p50']:,}, "
                   f"P99 {a['p99']:,}, max {a['max']:,}")
    if q["by_user_turns"]:
        out.append("  user turns   requests   mean prompt   growth   P99")
        for t in q["by_user_turns"]:
            g = "" if t["growth_vs_previous"] is None else f"{t['growth_vs_previous']:+.0f}"
            out.append(f"  {t['user_turns']:>10}{t['requests']:>11,}{t['mean']:>14.1f}{g:>9}"
                       f"{t['p99']:>6,}")
    for e in q["malformed_lines"][:10]:
        out.append(f"  line {e['line']}: {e['error']}")
    if len(q["malformed_lines"]) > 10:
        out.append(f"  ... and {len(q['malformed_lines']) - 10} more malformed lines (see --json)")
    return out

"""Raw pinned host<->device bandwidth, and the swap transfers alone (``swap --transfer-only``).

Raw figures, pinned host memory, measured in the process that measures the swaps:

* ``large``: one transfer of ``--bw-mib`` (1 GiB) each way by ``jax.device_put``: the link's best
  case (52.6 GB/s each way on the lent H100).
* ``pieces``: ``count`` transfers of the engine's piece size per call and one wait per call, by
  the two ways the swap can move them: one batched ``jax.device_put`` of the list
  (``device_put``), and a jitted copy whose outputs (device->host) or arguments (host->device) live
  in pinned host memory (``in_program``, how the swap programs transfer). The faster of the two is
  the like-for-like raw figure the swaps are compared with (``swap_pct_raw_bw``).
* ``sweep``: the same bytes per call cut into 1/4x to 4x the piece size, to choose the piece.

Each figure has the first call's GB/s (cold: compilation, fresh host memory) and the best and the
median of ``repeats`` warm calls; every call drops the previous call's outputs first, as the swap
pool does.

``--transfer-only`` (under a minute at full size, no model weights): a device pool of the
workload's no-pressure size with random bits, the real ``HostKVPool`` and ``SwapSpace``, and
``--rounds`` rounds of swapping sequences of the workload's length out and back one at a time,
as the engine does (transfers in the swap programs); every event against both raw figures, a bit-exact check of a sequence that went out and back every
round, and the swap programs' device scratch bytes (``scatter_copies_pool``: the scatter copies
whole pool arrays instead of writing in place, as XLA on the CPU does around its bitcasts).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
import types

import numpy as np

from benchmarks import harness
from benchmarks.common import print_table, write_result

logger = logging.getLogger(__name__)

MiB = 1 << 20


def _rates(nbytes: int, call, repeats: int) -> tuple[list[float], object]:
    """GB/s of 1 + ``repeats`` calls of ``call`` (dispatch, then wait); the last call's output."""
    import jax

    rates, out = [], None
    for _ in range(repeats + 1):
        out = None  # the previous output's host memory goes back first, as in the swap pool
        t = time.perf_counter()
        out = jax.block_until_ready(call())
        rates.append(nbytes / (time.perf_counter() - t) / 1e9)
    return rates, out


def _figures(direction: str, rates: list[float]) -> dict:
    warm = rates[1:]
    return {f"{direction}_gb_s": max(warm), f"{direction}_median_gb_s": float(np.median(warm)),
            f"{direction}_first_gb_s": rates[0], f"{direction}_all": rates}


def raw_large(nbytes: int, repeats: int = 5) -> dict:
    """One ``jax.device_put`` of ``nbytes`` device -> pinned host and back."""
    import jax
    import jax.numpy as jnp

    from pagedjax.worker.swap import host_memory_kind

    kind = host_memory_kind()
    x = jax.block_until_ready(jnp.ones((max(nbytes // 4, 1),), jnp.float32))
    dev = x.sharding
    to_host = ((lambda: jax.device_put(x, dev.with_memory_kind(kind))) if kind
               else (lambda: np.asarray(jax.device_get(x))))
    d2h, h = _rates(x.nbytes, to_host, repeats)
    h2d, _ = _rates(x.nbytes, lambda: jax.device_put(h, dev), repeats)
    return {"what": f"one {x.nbytes / MiB:.0f} MiB jax.device_put each way, best of {repeats} "
                    "warm repeats", "bytes": int(x.nbytes), "memory_kind": kind or "numpy",
            **_figures("d2h", d2h), **_figures("h2d", h2d)}


def raw_pieces(piece_bytes: int, count: int, repeats: int = 5) -> dict | None:
    """``count`` transfers of ``piece_bytes`` per call each way, by batched ``jax.device_put``
    and by a jitted copy to / from pinned host memory; None without pinned host memory."""
    import jax
    import jax.numpy as jnp

    from pagedjax.worker.swap import host_memory_kind

    kind = host_memory_kind()
    if kind is None:
        return None
    xs = jax.block_until_ready([jnp.full((max(piece_bytes // 4, 1),), i, jnp.float32)
                                for i in range(count)])
    dev = xs[0].sharding
    host = dev.with_memory_kind(kind)
    total = sum(x.nbytes for x in xs)
    d2h, hs = _rates(total, lambda: jax.device_put(xs, [host] * count), repeats)
    h2d, _ = _rates(total, lambda: jax.device_put(hs, [dev] * count), repeats)
    put = {**_figures("d2h", d2h), **_figures("h2d", h2d)}
    to_host = jax.jit(lambda *a: a, out_shardings=(host,) * count)
    to_dev = jax.jit(lambda *a: tuple(jax.device_put(y, dev) for y in a))
    d2h, hs = _rates(total, lambda: to_host(*xs), repeats)
    h2d, _ = _rates(total, lambda: to_dev(*hs), repeats)
    jit = {**_figures("d2h", d2h), **_figures("h2d", h2d)}
    best = {d: max(put[f"{d}_gb_s"], jit[f"{d}_gb_s"]) for d in ("d2h", "h2d")}
    return {"what": f"{count} transfers of {xs[0].nbytes / MiB:.2f} MiB per call each way, pinned "
                    f"host, one wait per call; best of {repeats} warm repeats of the faster of "
                    "batched jax.device_put and a jitted copy",
            "piece_bytes": int(xs[0].nbytes), "count": count, "bytes": int(total),
            "memory_kind": kind, "d2h_gb_s": best["d2h"], "h2d_gb_s": best["h2d"],
            "device_put": put, "in_program": jit}


def sweep(piece_bytes: int, count: int, repeats: int = 3) -> list[dict]:
    """``raw_pieces`` at 1/4x .. 4x the piece size, the bytes per call held at count x piece."""
    rows = []
    for f in (0.25, 0.5, 1, 2, 4):
        size, n = int(piece_bytes * f), max(1, int(round(count / f)))
        r = raw_pieces(size, n, repeats)
        if r is None:
            return []
        rows.append({"piece_mib": size / MiB, "count": n,
                     "put_d2h_gb_s": r["device_put"]["d2h_gb_s"],
                     "put_h2d_gb_s": r["device_put"]["h2d_gb_s"],
                     "jit_d2h_gb_s": r["in_program"]["d2h_gb_s"],
                     "jit_h2d_gb_s": r["in_program"]["h2d_gb_s"]})
    return rows


def pct_of_raw(out_bytes: float, out_s: float, in_bytes: float, in_s: float, raw: dict):
    """The time ``raw`` would take for the payload moved each way, over the time the swaps took,
    in percent (None when nothing moved)."""
    if out_s + in_s <= 0:
        return None
    ideal = out_bytes / (raw["d2h_gb_s"] * 1e9) + in_bytes / (raw["h2d_gb_s"] * 1e9)
    return 100.0 * ideal / (out_s + in_s)


def direction_figures(events, d: str) -> dict:
    mine = [e for e in events if e.direction == d]
    payload, secs = sum(e.payload_bytes for e in mine), sum(e.seconds for e in mine)
    return {"events": len(mine), "bytes": payload, "s": secs,
            "gb_s": payload / secs / 1e9 if secs else None,
            "median_event_gb_s": float(np.median([e.payload_bytes / e.seconds / 1e9
                                                  for e in mine])) if mine else None}


# ---- swap --transfer-only -------------------------------------------------------------------
def _random_pool(spec, seed: int):
    import jax

    from pagedjax.worker.kv_pool import allocate

    keys = iter(jax.random.split(jax.random.key(seed), 2 * spec.num_layers))
    bits = jax.numpy.dtype(f"uint{8 * jax.numpy.dtype(spec.dtype).itemsize}")
    return jax.block_until_ready([tuple(jax.lax.bitcast_convert_type(
        jax.random.bits(next(keys), x.shape, bits), x.dtype) for x in kv) for kv in allocate(spec)])


def _bits_of(pool, table):
    import jax

    from pagedjax.worker.kv_pool import gather_blocks

    x = jax.jit(gather_blocks)(pool, np.asarray(table, np.int32))
    return jax.lax.bitcast_convert_type(x, jax.numpy.dtype(f"uint{8 * x.dtype.itemsize}"))


def _cycle(args, spec, pool, seq_blocks: int):
    """Swap sequences out and back one at a time; (events, pool, bit-exact, host pool facts)."""
    import jax
    import jax.numpy as jnp

    from pagedjax.core.block_manager import BlockManager
    from pagedjax.worker.swap import HostKVPool, make_swap_space

    ns = types.SimpleNamespace(preemption_mode="swap", swap_space=args.swap_space,
                               num_cpu_blocks_override=None, kv_offloading_size=0.0)
    space = make_swap_space(ns, spec, args.max_model_len)
    runner = types.SimpleNamespace(pool=pool)
    t0 = time.perf_counter()
    host = HostKVPool(spec, space, runner)
    facts = {"transfers": host.transfers, "allocate_s": time.perf_counter() - t0,
             "piece_blocks": host.piece_blocks, "piece_bytes": host.piece_bytes,
             "pieces": len(host.pieces), "pieces_per_program": host.sizes,
             "pool_array_bytes": max(x.nbytes for x in jax.tree.leaves(runner.pool)),
             **host.program_temp_bytes(runner.pool)}
    bm = BlockManager(spec.num_blocks, spec.block_size)
    victims = range(min(3, args.num_prompts))
    for s in range(args.num_prompts):
        bm.append_slots(s, 0, seq_blocks * spec.block_size)
    before = _bits_of(runner.pool, bm.table(0))
    for _ in range(args.rounds):
        for s in victims:
            out = space.swap_out(bm, s)
            host.execute(types.SimpleNamespace(swap_out=out, swap_in=[], offload_out=[],
                                               offload_in=[]), runner)
            host.wait()  # one event at a time: each is timed alone
            back = space.swap_in(bm, s)
            host.execute(types.SimpleNamespace(swap_out=[], swap_in=back, offload_out=[],
                                               offload_in=[]), runner)
            host.wait()
    exact = bool(jnp.array_equal(before, _bits_of(runner.pool, bm.table(0))))
    events, pool = list(host.stats.events), runner.pool
    del host, runner
    gc.collect()
    return events, pool, exact, facts


def transfer_only(args) -> dict:
    from pagedjax.worker.kv_pool import KVPoolSpec
    from pagedjax.models import ModelConfig
    from pagedjax.models.loader import resolve_dtype
    from pagedjax.worker.swap import MAX_GROUP

    cfg = ModelConfig.from_hf(harness.hf_config_dict(args), source=args.model)
    shape = KVPoolSpec.for_model(cfg, 0, args.block_size, resolve_dtype(args.dtype))
    seq_blocks = shape.blocks_for(args.prompt_len + args.output_len)
    spec = dataclasses.replace(shape, num_blocks=args.num_prompts * seq_blocks)
    large = raw_large(int(args.bw_mib * MiB))
    pool = _random_pool(spec, args.seed)
    rows, variants = [], {}
    events, pool, exact, facts = _cycle(args, spec, pool, seq_blocks)
    count = min(MAX_GROUP, facts["pieces"])
    pieces, swept = raw_pieces(facts["piece_bytes"], count), sweep(facts["piece_bytes"], count)
    out, in_ = direction_figures(events, "out"), direction_figures(events, "in")
    v = variants["in-program"] = {**facts, "bit_exact": exact, "out": out, "in": in_,
                          "events": [{"direction": e.direction, "blocks": e.blocks,
                                      "pieces": e.pieces, "programs": e.programs,
                                      "ms": e.seconds * 1e3,
                                      "gb_s": e.payload_bytes / e.seconds / 1e9}
                                     for e in events]}
    for key, raw in (("pct_raw_pieces", pieces), ("pct_raw_large", large)):
        v[key] = (pct_of_raw(out["bytes"], out["s"], in_["bytes"], in_["s"], raw)
                  if raw else None)
    rows.append({"variant": "in-program", "transfers": facts["transfers"],
                 "out_gb_s": out["gb_s"], "in_gb_s": in_["gb_s"],
                 "out_median": out["median_event_gb_s"], "in_median": in_["median_event_gb_s"],
                 "pct_raw_pieces": v["pct_raw_pieces"], "pct_raw_large": v["pct_raw_large"],
                 "bit_exact": exact})
    d = variants["in-program"]
    summary = {
        "swap_pct_raw_bw": d["pct_raw_pieces"] if pieces else d["pct_raw_large"],
        "swap_pct_raw_bw_large": d["pct_raw_large"],
        "swap_out_gb_s": d["out"]["gb_s"], "swap_in_gb_s": d["in"]["gb_s"],
        "raw_piece_d2h_gb_s": pieces["d2h_gb_s"] if pieces else None,
        "raw_piece_h2d_gb_s": pieces["h2d_gb_s"] if pieces else None,
        "raw_large_d2h_gb_s": large["d2h_gb_s"], "raw_large_h2d_gb_s": large["h2d_gb_s"],
        "round_trip_bit_exact": d["bit_exact"],
        "swap_transfers": d["transfers"],
        "scatter_copies_pool": (d["scatter_temp_bytes"] >= d["pool_array_bytes"]
                                if d["scatter_temp_bytes"] is not None else None),
    }
    figures = {"model": cfg.name or args.model, "dtype": spec.dtype,
               "pool_blocks": spec.num_blocks, "block_bytes": spec.bytes_per_block,
               "sequence_blocks": seq_blocks, "rounds": args.rounds,
               "raw_bandwidth_large": large, "raw_bandwidth_pieces": pieces, "sweep": swept,
               "variants": variants, "table": rows,
               "basis": "swap_pct_raw_bw: the swaps (transfers in the swap programs) against "
                        "raw_bandwidth_pieces, the same transfer sizes; _large: against one "
                        "large transfer"}
    write_result("swap", summary, figures, out=args.out,
                 tag="transfer-tiny" if args.tiny else "transfer")
    print_table(rows)
    if swept:
        print_table(swept)
    print(f"raw one large transfer: {large['d2h_gb_s']:.1f} / {large['h2d_gb_s']:.1f} GB/s; "
          f"raw at the piece size: " + (f"{pieces['d2h_gb_s']:.1f} / {pieces['h2d_gb_s']:.1f} "
                                        "GB/s (device->host / host->device)" if pieces else "-"))
    return summary

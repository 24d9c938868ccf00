"""Who holds which KV block, right now: the view behind the server's ``GET /v1/kv`` and
``pagedjax top``.

``kv_view(engine, snapshot)`` reads the block manager, the scheduler's requests and the host swap
space (read only) and returns plain JSON-ready data:

- ``pool``: the device pool's size and how its blocks are used, and ``block_map``, one character
  per block (``BLOCK_STATES``): free, held by one sequence, shared by several (n > 1 samples,
  beams, a cached prefix in use by two requests), or free but still holding a cached prefix
  (reusable by the next request with that prefix, evicted last-freed-last).
- ``host``: the host swap pool the same way (``HOST_STATES``), or None without ``--swap-space``.
  Prefix blocks of the host tier (``--kv-offloading-size``) are "c", as cached device blocks.
- ``requests``: one row per live request, in arrival order.
- the engine's counters that explain the pool: preemptions, prefix-cache hits, swap traffic.

It must stay cheap (the server builds it on the engine thread between two steps, only while
someone polls): per block it does numpy work only; per request a set of its blocks.
"""
from __future__ import annotations

import time

import numpy as np

from pagedjax.core.sequence import Status
from pagedjax.stats import EngineSnapshot

BLOCK_STATES = {".": "free", "h": "held", "s": "shared", "c": "cached"}
HOST_STATES = {".": "free", "w": "swapped", "c": "cached prefix (host tier)"}
_CODES = np.frombuffer(b".hsc", np.uint8)  # index: 0 free, 1 held, 2 shared, 3 cached


def block_states(block_manager) -> np.ndarray:
    """Per device block: 0 free, 1 held by one sequence, 2 shared, 3 free with a cached prefix."""
    rc = np.asarray(block_manager.ref_counts, dtype=np.int32)
    states = np.minimum(rc, 2).astype(np.uint8)
    cached = getattr(block_manager, "block_key", None)  # prefix caching on
    if cached:
        blocks = np.fromiter(cached, np.int64, len(cached))
        states[blocks[rc[blocks] == 0]] = 3
    return states


def host_block_map(engine) -> dict | None:
    """The host pool: one character per host slot (``HOST_STATES``); None without one."""
    space = engine.swap_space
    if space is None:
        return None
    total = space.num_pieces * space.piece_blocks
    chars = bytearray(b"." * total)
    used = 0
    for seq_id in space.num_blocks:
        for slot in space.slots(seq_id):
            chars[slot] = ord("w")
            used += 1
    cache = getattr(engine, "host_cache", None)
    for slots in (cache.lru.values() if cache is not None else ()):
        for slot in slots:
            chars[slot] = ord("c")
            used += 1
    return {"num_blocks": total, "used": used, "usage": used / total,
            "block_map": chars.decode("ascii"), "legend": HOST_STATES}


def _request_row(req, bm, rc: list[int], swap) -> dict:
    seqs = [s for s in req.seqs if not s.finished]
    held: set[int] = set()
    for s in seqs:
        held.update(bm.table(s.seq_id))
    statuses = {s.status for s in seqs}
    if Status.RUNNING in statuses:
        state = "running"
    elif Status.SWAPPED in statuses:
        state = "swapped"
    elif req.num_preemptions:
        state = "preempted"  # waiting again after losing its blocks
    else:
        state = "waiting"
    beam = getattr(req, "beam", None)
    generated = [len(s.output_token_ids) - s.num_pending for s in req.seqs]
    return {
        "id": req.request_id,
        "state": state,
        "prompt_tokens": len(req.prompt_token_ids),
        # a beam search: its beams' length; n samples: their sum
        "generated_tokens": max(generated, default=0) if beam else sum(generated),
        "n": req.params.n if beam is None else 1,
        "beam_width": beam.p.beam_width if beam is not None else None,
        "sequences": len(seqs),
        "blocks_held": len(held),
        "blocks_shared": sum(1 for b in held if rc[b] > 1),
        "blocks_on_host": sum(swap.num_blocks.get(s.seq_id, 0) for s in seqs) if swap else 0,
        "preemptions": req.num_preemptions,
    }


def kv_view(engine, snap: EngineSnapshot) -> dict:
    """The view (module docstring) of ``engine`` now; ``snap`` is its ``make_stats()``."""
    bm, swap = engine.block_manager, engine.swap_space
    states = block_states(bm)
    counts = np.bincount(states, minlength=4)
    n = bm.num_blocks
    bytes_per_block = engine.spec.bytes_per_block
    rc = bm.ref_counts
    return {
        "built_at": time.time(),
        "step": snap.steps,
        "pool": {
            "num_blocks": n, "block_size": bm.block_size, "bytes_per_block": bytes_per_block,
            "free": int(counts[0] + counts[3]), "used": int(counts[1] + counts[2]),
            "held": int(counts[1]), "shared": int(counts[2]), "cached": int(counts[3]),
            "usage": float(counts[1] + counts[2]) / n,
            "block_map": _CODES[states].tobytes().decode("ascii"), "legend": BLOCK_STATES,
        },
        "host": host_block_map(engine),
        "num_running": snap.num_running, "num_waiting": snap.num_waiting,
        "num_swapped": snap.num_swapped,
        "requests": [_request_row(r, bm, rc, swap) for r in engine.requests.values()],
        "preemptions": {"total": snap.num_preemptions, "swap": snap.num_preemptions_swap,
                        "recompute": snap.num_preemptions_recompute},
        "prefix_cache": {
            "enabled": hasattr(bm, "block_key"), "queries": snap.prefix_cache_queries,
            "hits": snap.prefix_cache_hits,
            "hit_rate": (snap.prefix_cache_hits / snap.prefix_cache_queries
                         if snap.prefix_cache_queries else None),
        },
        "swap": {  # landed so far (a swap in flight counts on landing)
            "out_blocks": snap.swap_out_blocks, "in_blocks": snap.swap_in_blocks,
            "out_bytes": snap.swap_out_blocks * bytes_per_block,
            "in_bytes": snap.swap_in_blocks * bytes_per_block,
        },
        "tokens": {"prompt": snap.prompt_tokens, "generation": snap.generation_tokens,
                   "computed": snap.computed_tokens},
    }

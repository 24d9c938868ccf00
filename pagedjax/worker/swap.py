"""Host-offload swap: the host block pool and the transfers that fill and drain it.

The host pool is a list of fixed-size *pieces*, each one host array (pytree) of ``P`` device blocks
in ``kv_pool.gather_blocks`` layout ``[2L, P, block_size, K, H]``, in pinned host memory (JAX's
``pinned_host`` memory kind; numpy where the platform has none). Why pieces: a ``jax.Array`` is
immutable, so no transfer can write into part of one big host array; one piece is written whole
and read whole. One shape per piece means host chunks of one size that the allocator hands back
warm, and padding only in the last piece of each sequence. Pieces are <= 32 MiB (28 MiB for
Qwen2.5-7B: 32 blocks).

Transfers run inside the swap programs. A step's swap-out is one jitted program per group of
pieces (groups of 16, 8, 4, 2, 1 pieces: all compiled at start): it gathers the blocks of all its
pieces from the device pool (not donated) and its outputs *are* the host pieces (``out_shardings``
in ``pinned_host``), so XLA issues the device->host copies itself, back to back, with no runtime
round trip per piece. Swap-in is the mirror: one program per group takes the host pieces as
arguments, moves them to the device (``device_put`` inside the jit), concatenates them and
scatters every block into the donated pool. Why: a runtime transfer per piece has a fixed cost
that async dispatch does not overlap (benchmarks/NOTES.md, "swap transfers"). Where a platform
cannot compile transfers into a program, that direction falls back to the gather or scatter in
one program and the transfers as one batched ``jax.device_put``.

``execute`` waits for the pool (the step before, where the engine dispatches steps ahead), then
dispatches the swap programs and returns; the host prepares and dispatches the step while the
bytes move. Order, reasoned on the runtime's data dependencies:

* swap-out reads blocks that the scheduler has already freed, and this step (or the swap-in) may
  write into them. The gather is dispatched *before* the step, reading ``runner.pool`` as it is
  (the previous step's output: every token the scheduler counts as computed is in it); the step
  then donates that same pool. The runtime runs an execution that donates a buffer after every
  execution already dispatched that reads it (same stream, or the buffer's usage events), so the
  freed blocks are read before anything overwrites them. Dispatched after the step, the gather
  would read the step's output pool, where the freed blocks may already hold new K/V: that order
  would be wrong, and no wait could repair it.
* overlap of swap-out with the step: with the copies inside the gather program, the step (which
  donates the pool the program reads) runs after the whole program, copies included; only the
  ``device_put`` design, whose copies read the gather's own outputs and nothing else, lets them
  run beside the step. That costs little (a few swap-outs per thrashing run) and buys full link
  speed on every swap.
* swap-in scatters into the donated pool, and the step takes the scatter's output pool: the step
  cannot start before the blocks are in place.
* host pieces are never written in place: a swap-out makes new arrays, and a swap-in reads the
  arrays it was handed (taken before this step's swap-out replaces any). Reading a piece whose
  swap-out has not finished waits for it (its definition event).

The host prefix tier (``--kv-offloading-size``, ``pagedjax.core.host_cache``) moves its blocks
through the same programs and pieces: a step's copies of evicted blocks to the host ("store")
are dispatched after its swap-out and before any scatter, and its loads of cached blocks
("load") after its swap-in. The same order argument holds: a stored block was freed by the
scheduler and is read before anything (this step's loads, the step) writes there; a loaded block
is in place before the step that reads it. Unlike a swap, these run on most steps under load, so
``execute`` does not wait for the pool before them: the step before may still run (async
scheduling), and their event's clock starts when it has finished (``after``).

Timing: each step's swap-out and swap-in is one ``SwapEvent``; a short-lived thread waits for its
outputs (the host pieces; for swap-in a scalar output of the scatter programs, defined when the
program completes) and records the time from dispatch to data in place. The device is idle at
dispatch (``execute`` waited for the pool: swaps are rare, and without that wait a step queued
ahead would count as transfer time), so that is the swap's own time: transfers plus the gather
or scatter (a few percent). The watcher reads the clock when it gets the GIL back, at once while
the engine waits for a step's tokens; a long Python stretch on the engine's thread can only make
a swap look slower. ``stats`` waits for events still in flight.

The pool is allocated and touched at start by running the real swap programs into every piece,
plus one program's worth of headroom (a piece being replaced may still be read by a swap-in in
flight, so its memory is not back yet): a first transfer into fresh host memory is far slower
than into warm pinned memory (benchmarks/NOTES.md).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.worker import kv_pool
from pagedjax.core.swap_space import SwapSpace

logger = logging.getLogger(__name__)

MiB = 1 << 20
PIECE_TARGET_BYTES = 32 * MiB
# With the host prefix tier a step's stores fill fresh pieces and a load moves whole pieces for
# the blocks it needs: smaller pieces waste less of both
OFFLOAD_PIECE_TARGET_BYTES = 8 * MiB
MAX_GROUP = 16  # pieces per swap program; programs for 16, 8, 4, 2 and 1 pieces


def piece_blocks_for(bytes_per_block: int, num_cpu_blocks: int, max_blocks_per_seq: int,
                     target_bytes: int = PIECE_TARGET_BYTES) -> int:
    """Blocks per host piece: a power of two of about ``target_bytes``, at most an eighth of
    the longest sequence (bounding the last piece's padding) and at most the whole host pool."""
    def floor_pow2(n: int) -> int:
        return 1 << (max(int(n), 1).bit_length() - 1)

    return min(floor_pow2(target_bytes // bytes_per_block),
               floor_pow2(max_blocks_per_seq // 8), floor_pow2(num_cpu_blocks))


def make_swap_space(args, spec: kv_pool.KVPoolSpec, max_model_len: int) -> SwapSpace | None:
    """The host tier's bookkeeping: one pool of ``--swap-space`` (with ``--preemption-mode swap``)
    + ``--kv-offloading-size`` GiB that swapped sequences and the host prefix cache share; None
    when neither is on."""
    swap = args.preemption_mode == "swap"
    if not swap and not args.kv_offloading_size:
        return None
    gib = (args.swap_space if swap else 0.0) + args.kv_offloading_size
    num_cpu_blocks = args.num_cpu_blocks_override or int(gib * kv_pool.GiB
                                                         // spec.bytes_per_block)
    if num_cpu_blocks < 1:
        flags = "--swap-space" if not args.kv_offloading_size else "--kv-offloading-size"
        raise ValueError(
            f"{flags} ({gib} GiB of host tier) holds no KV block "
            f"({spec.bytes_per_block / MiB:.2f} MiB each): raise {flags}"
            + (" or use --preemption-mode recompute" if not args.kv_offloading_size else ""))
    _check_host_memory(num_cpu_blocks * spec.bytes_per_block)
    piece = piece_blocks_for(spec.bytes_per_block, num_cpu_blocks, spec.blocks_for(max_model_len),
                             OFFLOAD_PIECE_TARGET_BYTES if args.kv_offloading_size
                             else PIECE_TARGET_BYTES)
    return SwapSpace(num_cpu_blocks // piece, piece, spec.block_size)


def _check_host_memory(nbytes: int) -> None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.7 * total:
        raise ValueError(f"--swap-space + --kv-offloading-size ask for {nbytes / kv_pool.GiB:.1f} "
                         f"GiB of host memory, more than 70% of this machine's "
                         f"{total / kv_pool.GiB:.1f} GiB: lower them")
    if nbytes > 0.4 * total:
        logger.warning("the host KV tier (--swap-space + --kv-offloading-size) takes %.1f GiB, %.0f%% of host memory",
                       nbytes / kv_pool.GiB, 100 * nbytes / total)


DIRECTIONS = ("out", "in", "store", "load")


@dataclasses.dataclass
class SwapEvent:
    time: float  # time.perf_counter() at dispatch
    direction: str  # "out" | "in" (swap), "store" | "load" (host prefix tier)
    blocks: int  # device blocks moved (payload)
    pieces: int  # host pieces moved (what crossed the link, padding included)
    payload_bytes: int
    link_bytes: int
    seconds: float  # dispatch (or the step before it done) -> data in place
    programs: int = 1  # swap programs (groups of pieces) dispatched


@dataclasses.dataclass
class SwapStats:
    events: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=100_000))
    blocks: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    payload_bytes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    link_bytes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    seconds: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))

    def add(self, e: SwapEvent) -> None:
        self.events.append(e)
        self.blocks[e.direction] += e.blocks
        self.payload_bytes[e.direction] += e.payload_bytes
        self.link_bytes[e.direction] += e.link_bytes
        self.seconds[e.direction] += e.seconds


def host_memory_kind() -> str | None:
    """``pinned_host`` where this platform's device offers it, else None (numpy host arrays)."""
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def group_sizes(n: int, sizes) -> list[int]:
    """``n`` pieces as groups of the compiled sizes (descending powers of two): 17 -> [16, 1]."""
    out = []
    for s in sizes:
        out += [s] * (n // s)
        n %= s
    return out


def _on_bits(f, *xs):
    """``f`` applied to the raw bits of same-dtype arrays ``xs``: XLA on the CPU computes bf16 in
    f32 and would canonicalise NaN payloads in a slice or concatenate (cf. ``kv_pool._bits``)."""
    dtype = xs[0].dtype
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
    return jax.lax.bitcast_convert_type(
        f(*(jax.lax.bitcast_convert_type(x, bits) for x in xs)), dtype)


def _split(staging, g: int):
    """``g`` pieces of a gathered staging pytree whose leaves are [2L, g * P, ...]."""
    def piece(x, i):
        return _on_bits(lambda b: b.reshape(b.shape[0], g, b.shape[1] // g, *b.shape[2:])[:, i], x)

    return tuple(jax.tree.map(lambda x: piece(x, i), staging) for i in range(g))


def _gather_program(g: int, out_shardings):
    def gather(pool, ids):  # ids [g, P] -> g pieces (on the host when out_shardings say so)
        return _split(kv_pool.gather_blocks(pool, ids.reshape(-1)), g)

    return jax.jit(gather, out_shardings=out_shardings)


def _scatter_program(to_device):
    def scatter(pool, pieces, ids):  # g pieces (host or device), ids [g, P]; -1 writes nothing
        if to_device is not None:
            pieces = tuple(jax.device_put(p, to_device) for p in pieces)
        staging = jax.tree.map(
            lambda *xs: _on_bits(lambda *b: jnp.concatenate(b, axis=1), *xs), *pieces)
        # ids[0, 0] is a marker output: defined when the whole program has run, and not donated
        # to the step like the pool, so the event's watcher can wait on it.
        return kv_pool.scatter_blocks(pool, staging, ids.reshape(-1)), ids[0, 0]

    return jax.jit(scatter, donate_argnums=0)


class HostKVPool:
    """The host pieces and the swap transfers; ``execute`` dispatches one step's swaps on the
    runner's pool. Bookkeeping (which slot holds what) is the ``SwapSpace``'s."""

    def __init__(self, spec: kv_pool.KVPoolSpec, space: SwapSpace, runner):
        self.spec, self.space = spec, space
        self.piece_blocks = space.piece_blocks
        self.block_bytes = spec.bytes_per_block
        self.memory_kind = host_memory_kind()
        want = self.memory_kind is not None
        self.in_program = {"out": want, "in": want}  # where the transfers run, per direction
        self.sizes = [s for s in (16, 8, 4, 2, 1) if s <= min(MAX_GROUP, space.num_pieces)]
        self.pieces: list = [None] * space.num_pieces
        self._stats = SwapStats()
        self._lock = threading.Lock()
        self._watchers: list[threading.Thread] = []
        self._allocate(runner)

    @property
    def stats(self) -> SwapStats:
        self.wait()
        return self._stats

    @property
    def landed(self) -> SwapStats:
        """The swaps recorded so far, without waiting for those in flight."""
        return self._stats

    @property
    def num_compilations(self) -> int:
        return sum(f._cache_size() for f in (*self._gathers.values(), *self._scatters.values()))

    @property
    def total_bytes(self) -> int:
        return len(self.pieces) * self.piece_bytes

    @property
    def transfers(self) -> str:
        """How the bytes travel, e.g. ``in the swap programs`` or ``out: jax.device_put, ...``."""
        how = {d: "in the swap programs" if v else "jax.device_put" if self.memory_kind
               else "numpy" for d, v in self.in_program.items()}
        return how["out"] if how["out"] == how["in"] else f"out: {how['out']}, in: {how['in']}"

    def program_temp_bytes(self, pool) -> dict:
        """Device scratch bytes of the largest swap programs (XLA's memory analysis): a scatter
        whose scratch is the size of a pool array copies that array instead of writing in place."""
        g, ids = self.sizes[0], np.zeros((self.sizes[0], self.piece_blocks), np.int32)
        pieces = tuple(self.pieces[:g])
        out = {}
        for name, lowered in (("gather", lambda: self._gathers[g].lower(pool, ids)),
                              ("scatter", lambda: self._scatters[g].lower(pool, pieces, ids))):
            m = lowered().compile().memory_analysis()
            out[f"{name}_temp_bytes"] = None if m is None else int(m.temp_size_in_bytes)
        return out

    def wait(self) -> None:
        """Until every dispatched swap has landed and been recorded."""
        for t in self._watchers:
            t.join()
        self._watchers.clear()

    # ---- start ---------------------------------------------------------------------------------
    def _allocate(self, runner) -> None:
        """Compile every swap program and allocate and touch every piece by running them."""
        t0 = time.perf_counter()
        # Commit the pool to its sharding now: a step's output pool is committed, and jit compiles
        # committed and uncommitted arguments separately.
        runner.pool = jax.tree.map(lambda x: jax.device_put(x, x.sharding), runner.pool)
        probe = jax.jit(kv_pool.gather_blocks)(runner.pool, np.zeros(self.piece_blocks, np.int32))
        self.piece_bytes = sum(x.nbytes for x in jax.tree.leaves(probe))
        self._dev = jax.tree.map(lambda x: x.sharding, probe)
        self._host = (jax.tree.map(lambda s: s.with_memory_kind(self.memory_kind), self._dev)
                      if self.memory_kind else None)
        del probe
        for direction, build in (("out", self._build_out), ("in", self._build_in)):
            try:
                build(runner)
            except Exception as e:  # noqa: BLE001 - a platform without in-program transfers
                if not self.in_program[direction]:
                    raise
                logger.warning("swap-%s: transfers inside the swap programs failed here (%s: %s);"
                               " using jax.device_put", direction, type(e).__name__, e)
                self.in_program[direction] = False
                build(runner)
        logger.info("CPU swap space: %d pieces x %d blocks = %d blocks (%.2f GiB, %s, transfers "
                    "%s) allocated in %.2f s", len(self.pieces), self.piece_blocks,
                    len(self.pieces) * self.piece_blocks, self.total_bytes / kv_pool.GiB,
                    self.memory_kind or "numpy", self.transfers, time.perf_counter() - t0)

    def _build_out(self, runner) -> None:
        out_sh = self._host if self.in_program["out"] else None
        self._gathers = {g: _gather_program(g, (out_sh,) * g if out_sh else None)
                         for g in self.sizes}
        zeros = np.zeros(self.piece_blocks, np.int32)
        everything = list(range(len(self.pieces)))
        self.pieces = [None] * len(self.pieces)
        self._swap_out(runner.pool, [(p, zeros) for p in everything], watch=False)
        for g in self.sizes:  # every program size runs once, into pieces that exist anyway
            self._swap_out(runner.pool, [(p, zeros) for p in everything[:g]], watch=False)
        # Headroom: a piece being replaced may still be read by a swap-in in flight.
        headroom = self._dispatch_out(runner.pool, [(None, zeros)] * self.sizes[0])
        jax.block_until_ready([self.pieces, headroom])

    def _build_in(self, runner) -> None:
        self._scatters = {g: _scatter_program(self._dev if self.in_program["in"] else None)
                          for g in self.sizes}
        nowhere = np.full(self.piece_blocks, -1, np.int32)  # padding only: writes nothing
        for g in self.sizes:
            runner.pool, marks = self._dispatch_in(
                runner.pool, [(self.pieces[p], nowhere) for p in range(g)])
            jax.block_until_ready(marks)
        jax.block_until_ready(runner.pool)

    # ---- one step ------------------------------------------------------------------------------
    def execute(self, batch, runner, after=None) -> float:
        """Dispatch this step's copies to the host (swap-out, then the prefix tier's stores),
        then back (swap-in, then its loads), on ``runner.pool``; returns the seconds the host
        waited on the device (for the pool; on a platform without pinned host memory also for
        the transfers), which the engine keeps out of its host time. ``after``: an output of the
        step dispatched before (its sampled tokens), from which a store or load is timed."""
        t0 = time.perf_counter()
        if batch.swap_out or batch.swap_in:
            jax.block_until_ready(runner.pool)  # the step before: its time is not the swap's
            after = None
        waited = time.perf_counter() - t0
        # Host arrays are taken before the copies out can refill a piece freed (or evicted) by
        # this step's schedule.
        incoming, loads = ([(self.pieces[piece], dst)
                            for piece, dst in self._by_piece(moves, pad=-1)]
                           for moves in (batch.swap_in, batch.offload_in))
        if batch.swap_out:
            self._swap_out(runner.pool, self._by_piece([(s, d) for d, s in batch.swap_out], pad=0),
                           "out", len(batch.swap_out))
        stored = None
        if batch.offload_out:
            stored = self._swap_out(
                runner.pool, self._by_piece([(s, d) for d, s in batch.offload_out], pad=0),
                "store", len(batch.offload_out), after=after)
        if incoming:
            runner.pool = self._swap_in(runner.pool, incoming, "in", len(batch.swap_in))
        if loads:  # timed from the stores before it, which the device runs first
            runner.pool = self._swap_in(runner.pool, loads, "load", len(batch.offload_in),
                                        after=stored or after)
        return time.perf_counter() - t0 if self.memory_kind is None else waited

    def _by_piece(self, slot_block: list[tuple[int, int]], pad: int):
        """Group (host slot, device block) pairs by piece: device block ids by row, padded."""
        rows: dict[int, np.ndarray] = {}
        for slot, block in slot_block:
            piece, row = divmod(slot, self.piece_blocks)
            if piece not in rows:
                rows[piece] = np.full(self.piece_blocks, pad, np.int32)
            rows[piece][row] = block
        return list(rows.items())

    def _swap_out(self, pool, groups, direction: str = "out", blocks: int = 0,
                  watch: bool = True, after=None) -> list:
        t0 = time.perf_counter()
        for piece, _ in groups:  # release the old chunks before taking new ones of their size
            self.pieces[piece] = None
        new = self._dispatch_out(pool, groups)
        for (piece, _), host in zip(groups, new):
            self.pieces[piece] = host
        if watch:
            self._watch(direction, t0, blocks, len(groups), new, after)
        return new

    def _dispatch_out(self, pool, groups) -> list:
        """The swap-out programs for ``groups`` [(piece, device ids [P])]: the new host pieces."""
        new, at = [], 0
        for g in group_sizes(len(groups), self.sizes):
            ids = np.stack([ids for _, ids in groups[at:at + g]])
            new += self._gathers[g](pool, ids)
            at += g
        if self.in_program["out"]:
            return new
        if self.memory_kind is None:
            return [jax.tree.map(np.asarray, jax.device_get(p)) for p in new]
        leaves, tree = jax.tree.flatten(new)
        host = jax.tree.leaves([self._host] * len(new))
        return jax.tree.unflatten(tree, jax.device_put(leaves, host))  # one batched call

    def _swap_in(self, pool, incoming, direction: str, blocks: int, after=None):
        t0 = time.perf_counter()
        pool, marks = self._dispatch_in(pool, incoming)
        self._watch(direction, t0, blocks, len(incoming), marks, after)
        return pool

    def _dispatch_in(self, pool, incoming):
        """The swap-in programs for ``incoming`` [(host piece, device ids [P])]."""
        pieces = [p for p, _ in incoming]
        if not self.in_program["in"] and self.memory_kind is not None:
            leaves, tree = jax.tree.flatten(pieces)
            dev = jax.tree.leaves([self._dev] * len(pieces))
            pieces = jax.tree.unflatten(tree, jax.device_put(leaves, dev))  # one batched call
        marks, at = [], 0
        for g in group_sizes(len(incoming), self.sizes):
            ids = np.stack([ids for _, ids in incoming[at:at + g]])
            pool, mark = self._scatters[g](pool, tuple(pieces[at:at + g]), ids)
            marks.append(mark)
            at += g
        return pool, marks

    # ---- timing --------------------------------------------------------------------------------
    def _watch(self, direction: str, t0: float, blocks: int, pieces: int, ready,
               after=None) -> None:
        """Record the event once ``ready`` is; its clock starts at ``t0``, or when ``after`` (work
        the device runs first) is ready if it was not yet at dispatch."""
        programs = len(group_sizes(pieces, self.sizes))
        if after is not None and all(x.is_ready() for x in jax.tree.leaves(after)):
            after = None
        t = threading.Thread(target=self._finish, name=f"pagedjax-swap-{direction}", daemon=True,
                             args=(direction, t0, blocks, pieces, programs, ready, after))
        t.start()
        self._watchers = [w for w in self._watchers if w.is_alive()] + [t]

    def _finish(self, direction, t0, blocks, pieces, programs, ready, after) -> None:
        try:
            if after is not None:
                jax.block_until_ready(after)
                t0 = max(t0, time.perf_counter())
            jax.block_until_ready(ready)
        except Exception:  # noqa: BLE001 - the step that uses the pool reports the failure
            logger.exception("swap-%s of %d blocks failed", direction, blocks)
            return
        seconds = time.perf_counter() - t0
        e = SwapEvent(t0, direction, blocks, pieces, blocks * self.block_bytes,
                      pieces * self.piece_bytes, seconds, programs)
        with self._lock:
            self._stats.add(e)
        what = (f"Swapping {direction}" if direction in ("out", "in") else
                "Host prefix tier: " + {"store": "storing", "load": "loading"}[direction])
        # the tier moves blocks on most steps under load: its lines are debug
        logger.log(logging.INFO if direction in ("out", "in") else logging.DEBUG,
                   "%s %d blocks (%.1f MiB) in %.1f ms (%.1f GB/s)", what, blocks,
                   e.payload_bytes / MiB, seconds * 1e3,
                   e.payload_bytes / max(seconds, 1e-9) / 1e9)

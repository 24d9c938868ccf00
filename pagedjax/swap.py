"""Host-offload swap: the host block pool and the transfers that fill and drain it.

The host pool is a list of fixed-size *pieces*, each one host array of ``P`` device blocks
``[2L, P, block_size, K, H]`` in pinned host memory (JAX's ``pinned_host`` memory kind; plain
numpy where the platform has none). Why pieces: a ``jax.Array`` is immutable, so no transfer can
write into part of one big host array; instead one device->host transfer produces a whole piece
and one host->device transfer consumes a whole piece. One shape means one compiled gather and one
compiled scatter (nothing compiles after start), host chunks of one size that the allocator hands
back warm, and padding only in the last piece of each sequence. Pieces are sized to ~32 MiB so the
fixed cost of a transfer is small against its bytes.

Swap-out, per piece: a jitted gather of the blocks from the device pool (not donated) into a
staging array, then one device->host transfer. Swap-in, per piece: one host->device transfer, then
a jitted scatter into the donated pool. Both run before the step is dispatched and wait for their
transfers, so every log line's time is the transfer's own: the step needs swapped-in blocks anyway;
on the way out this gives up overlap with the step in exchange for exact figures (and the freed
blocks are read before anything can write them).

The pool is allocated and touched at start by running the real transfer path into every piece:
on the lent H100 a first transfer into fresh host memory ran at 1.7 GB/s, into warm pinned memory
at ~50 GB/s (ANCHORS.md).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import jax
import numpy as np

from . import kv_pool
from .swap_space import SwapSpace

logger = logging.getLogger(__name__)

MiB = 1 << 20
PIECE_TARGET_BYTES = 32 * MiB


def piece_blocks_for(bytes_per_block: int, num_cpu_blocks: int, max_blocks_per_seq: int) -> int:
    """Blocks per host piece: a power of two of about PIECE_TARGET_BYTES, at most an eighth of
    the longest sequence (bounding the last piece's padding) and at most the whole host pool."""
    def floor_pow2(n: int) -> int:
        return 1 << (max(int(n), 1).bit_length() - 1)

    return min(floor_pow2(PIECE_TARGET_BYTES // bytes_per_block),
               floor_pow2(max_blocks_per_seq // 8), floor_pow2(num_cpu_blocks))


def make_swap_space(args, spec: kv_pool.KVPoolSpec, max_model_len: int) -> SwapSpace | None:
    """The host-side swap bookkeeping for ``--preemption-mode swap``; None for recompute."""
    if args.preemption_mode != "swap":
        return None
    num_cpu_blocks = args.num_cpu_blocks_override or int(args.swap_space * kv_pool.GiB
                                                         // spec.bytes_per_block)
    if num_cpu_blocks < 1:
        raise ValueError(
            f"--swap-space {args.swap_space} GiB holds no KV block "
            f"({spec.bytes_per_block / MiB:.2f} MiB each): raise --swap-space or use "
            "--preemption-mode recompute")
    _check_host_memory(num_cpu_blocks * spec.bytes_per_block)
    piece = piece_blocks_for(spec.bytes_per_block, num_cpu_blocks,
                             -(-max_model_len // spec.block_size))
    return SwapSpace(num_cpu_blocks // piece, piece, spec.block_size)


def _check_host_memory(nbytes: int) -> None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.7 * total:
        raise ValueError(f"--swap-space asks for {nbytes / kv_pool.GiB:.1f} GiB of host memory, "
                         f"more than 70% of this machine's {total / kv_pool.GiB:.1f} GiB: lower it")
    if nbytes > 0.4 * total:
        logger.warning("--swap-space takes %.1f GiB, %.0f%% of host memory",
                       nbytes / kv_pool.GiB, 100 * nbytes / total)


@dataclasses.dataclass
class SwapEvent:
    time: float  # time.perf_counter() at the start
    direction: str  # "out" | "in"
    blocks: int  # device blocks moved (payload)
    pieces: int  # host pieces moved (what crossed the link, padding included)
    payload_bytes: int
    link_bytes: int
    seconds: float


@dataclasses.dataclass
class SwapStats:
    events: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=100_000))
    blocks: dict = dataclasses.field(default_factory=lambda: {"out": 0, "in": 0})
    payload_bytes: dict = dataclasses.field(default_factory=lambda: {"out": 0, "in": 0})
    link_bytes: dict = dataclasses.field(default_factory=lambda: {"out": 0, "in": 0})
    seconds: dict = dataclasses.field(default_factory=lambda: {"out": 0.0, "in": 0.0})

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


class HostKVPool:
    """The host pieces and the swap transfers; ``execute`` runs one step's swaps on the runner's
    pool. Bookkeeping (which slot holds what) is the ``SwapSpace``'s."""

    def __init__(self, spec: kv_pool.KVPoolSpec, space: SwapSpace, runner):
        self.spec, self.space = spec, space
        p = self.piece_blocks = space.piece_blocks
        self.piece_shape = (2 * spec.num_layers, p, spec.block_size, spec.num_kv_heads,
                            spec.head_dim)
        self.piece_bytes = int(np.prod(self.piece_shape)) * kv_pool.dtype_bytes(spec.dtype)
        self.block_bytes = spec.bytes_per_block
        self.memory_kind = host_memory_kind()
        self.stats = SwapStats()
        self._gather = jax.jit(kv_pool.gather_blocks)
        self._scatter = jax.jit(kv_pool.scatter_blocks, donate_argnums=0)
        self.pieces: list = [None] * space.num_pieces
        self._allocate(runner)

    @property
    def num_compilations(self) -> int:
        return self._gather._cache_size() + self._scatter._cache_size()

    @property
    def total_bytes(self) -> int:
        return len(self.pieces) * self.piece_bytes

    def _allocate(self, runner) -> None:
        """Allocate and touch every piece through the real transfer path, and compile both jits."""
        t0 = time.perf_counter()
        # Commit the pool to its sharding now: a step's output pool is committed, and jit compiles
        # committed and uncommitted arguments separately.
        runner.pool = jax.tree.map(lambda x: jax.device_put(x, x.sharding), runner.pool)
        staging = self._gather(runner.pool, np.zeros(self.piece_blocks, np.int32))
        self._device_sharding = staging.sharding
        self._host_sharding = (staging.sharding.with_memory_kind(self.memory_kind)
                               if self.memory_kind else None)
        for i in range(len(self.pieces)):
            self.pieces[i] = self._to_host(staging)
        jax.block_until_ready(self.pieces)
        nowhere = np.full(self.piece_blocks, -1, np.int32)  # padding only: writes nothing
        runner.pool = self._scatter(runner.pool, self._to_device(self.pieces[0]), nowhere)
        jax.block_until_ready(runner.pool)
        logger.info("CPU swap space: %d pieces x %d blocks = %d blocks (%.2f GiB, %s) allocated "
                    "in %.2f s", len(self.pieces), self.piece_blocks,
                    len(self.pieces) * self.piece_blocks, self.total_bytes / kv_pool.GiB,
                    self.memory_kind or "numpy", time.perf_counter() - t0)

    def _to_host(self, x: jax.Array):
        if self._host_sharding is None:
            return np.asarray(jax.device_get(x))
        return jax.device_put(x, self._host_sharding)

    def _to_device(self, x) -> jax.Array:
        return jax.device_put(x, self._device_sharding)

    # ---- one step ----------------------------------------------------------------------------
    def execute(self, batch, runner) -> float:
        """This step's swap-out, then swap-in, on ``runner.pool``; returns the seconds spent."""
        t0 = time.perf_counter()
        # Host arrays are read before the swap-out can refill a piece freed by this step's swap-in.
        incoming = [(self.pieces[piece], dst)
                    for piece, dst in self._by_piece(batch.swap_in, pad=-1)]
        if batch.swap_out:
            self._swap_out(runner.pool, batch.swap_out)
        if incoming:
            runner.pool = self._swap_in(runner.pool, incoming, len(batch.swap_in))
        return time.perf_counter() - t0

    def _by_piece(self, slot_block: list[tuple[int, int]], pad: int):
        """Group (host slot, device block) pairs by piece: device block ids by row, padded."""
        rows: dict[int, np.ndarray] = {}
        for slot, block in slot_block:
            piece, row = divmod(slot, self.piece_blocks)
            if piece not in rows:
                rows[piece] = np.full(self.piece_blocks, pad, np.int32)
            rows[piece][row] = block
        return list(rows.items())

    def _swap_out(self, pool, pairs: list[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        groups = self._by_piece([(slot, dev) for dev, slot in pairs], pad=0)
        for piece, ids in groups:
            staging = self._gather(pool, ids)  # [2L, P, block_size, K, H] on the device
            self.pieces[piece] = None  # give the old chunk back before taking one of its size
            self.pieces[piece] = self._to_host(staging)
        jax.block_until_ready([self.pieces[piece] for piece, _ in groups])
        self._record("out", t0, len(pairs), len(groups))

    def _swap_in(self, pool, incoming, num_blocks: int):
        t0 = time.perf_counter()
        for host, dst in incoming:
            pool = self._scatter(pool, self._to_device(host), dst)
        jax.block_until_ready(pool)
        self._record("in", t0, num_blocks, len(incoming))
        return pool

    def _record(self, direction: str, t0: float, blocks: int, pieces: int) -> None:
        seconds = time.perf_counter() - t0
        e = SwapEvent(t0, direction, blocks, pieces, blocks * self.block_bytes,
                      pieces * self.piece_bytes, seconds)
        self.stats.add(e)
        logger.info("Swapping %s %d blocks (%.1f MiB) in %.1f ms (%.1f GB/s)", direction, blocks,
                    e.payload_bytes / MiB, seconds * 1e3,
                    e.payload_bytes / max(seconds, 1e-9) / 1e9)

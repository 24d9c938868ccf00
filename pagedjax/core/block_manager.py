"""Paged KV memory on the host side: fixed-size blocks, a free list, reference counts and one
block table per sequence. Plain Python; the device only ever sees the resulting int arrays.

Methods come in check-then-act pairs (``can_append`` / ``append_slots``, ``can_fork`` / ``fork``)
so the scheduler decides before anything changes. Sharing is by reference count: a forked
sequence points at its parent's blocks, and the first write into a shared block copies it
(copy-on-write): ``append_slots`` returns the ``(src, dst)`` block copies the device must make
before it writes this step's K/V.
"""
from __future__ import annotations

from collections import OrderedDict

# A table entry whose block was released (bounded KV: ``release_outside_window``): the position
# keeps its index, no block is held, and the attention never reads it.
RELEASED = -1


class BlockManager:
    sink_tokens = window = 0  # bounded KV off (set_window)

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # insertion-ordered: blocks are reused least recently freed first (the LRU order prefix
        # caching evicts in), and a cached block can leave the free list in O(1) on a hit
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        # block copies (src, dst) to run with the next step, outside copy-on-write: the seam a
        # fork that copies instead of sharing uses (benchmarks/beam.py)
        self.pending_copies: list[tuple[int, int]] = []
        self.queries = self.hits = 0  # prefix-cache lookups and hits, in tokens

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _needed(self, seq_id: int, num_computed: int, num_new: int) -> int:
        table = self.table(seq_id)
        grow = max(self.blocks_for(num_computed + num_new) - len(table), 0)
        first = num_computed // self.block_size  # block receiving the first new token
        cow = 1 if num_new and first < len(table) and self.ref_counts[table[first]] > 1 else 0
        return grow + cow

    # ---- append --------------------------------------------------------------------------
    def can_append(self, seq_id: int, num_computed: int, num_new: int) -> bool:
        return self._needed(seq_id, num_computed, num_new) <= self.num_free

    def can_append_all(self, appends: list[tuple[int, int, int]]) -> bool:
        """Room for every (seq_id, num_computed, num_new) at once (blocks the sequences share
        are counted once per sequence: a safe bound)."""
        return sum(self._needed(*a) for a in appends) <= self.num_free

    def append_slots(self, seq_id: int, num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """Make room for tokens ``num_computed .. num_computed + num_new - 1``; returns CoW copies."""
        table = self.tables.setdefault(seq_id, [])
        first = num_computed // self.block_size  # block receiving the first new token
        shared = num_new and first < len(table) and self.ref_counts[table[first]] > 1
        grow = self.blocks_for(num_computed + num_new) - len(table)
        if max(grow, 0) + shared > self.num_free:
            raise RuntimeError(f"append_slots without room: seq {seq_id} needs "
                               f"{max(grow, 0) + shared} blocks, {self.num_free} free "
                               "(call can_append first)")
        copies = []
        if shared:
            src = table[first]
            dst = self._take()
            self.ref_counts[src] -= 1
            table[first] = dst
            copies.append((src, dst))
        for _ in range(grow):
            table.append(self._take())
        return copies

    def slot(self, seq_id: int, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- sharing -------------------------------------------------------------------------
    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (no copy until someone writes)."""
        if child_id in self.tables:
            raise RuntimeError(f"fork: sequence {child_id} already has blocks")
        table = list(self.table(parent_id))
        for b in table:
            if b != RELEASED:
                self.ref_counts[b] += 1
        self.tables[child_id] = table

    def free(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id, [])):
            if b != RELEASED:
                self._unref(b)

    def _unref(self, b: int) -> None:
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self._release(b)

    # ---- bounded KV: sinks + window (StreamingLLM) -------------------------------------------
    def set_window(self, sink_tokens: int, window: int) -> None:
        """Queries see only the first ``sink_tokens`` positions and the last ``window``
        (pagedjax.kernels.reference.visible); window 0: everything (nothing is released)."""
        self.sink_tokens, self.window = sink_tokens, window

    def release_outside_window(self, seq_id: int, next_pos: int) -> None:
        """Release the sequence's blocks that no query at a position >= ``next_pos`` sees: block
        b (positions [b * bs, (b + 1) * bs)) with b * bs >= sink_tokens and (b + 1) * bs <=
        next_pos - window. Its table entry becomes RELEASED. The released range grows from the
        sinks up, so the walk down from the new bound stops at the first released entry."""
        table = self.tables.get(seq_id)
        if not self.window or not table:
            return
        first = -(-self.sink_tokens // self.block_size)
        b = min((next_pos - self.window) // self.block_size, len(table)) - 1
        while b >= first and table[b] != RELEASED:
            self._unref(table[b])
            table[b] = RELEASED
            b -= 1

    def restore_released(self, seq_id: int, layout: list[int]) -> None:
        """Put RELEASED entries back where ``layout`` (the table it had) has them, the sequence's
        blocks filling the others in order (a sequence swapped back in)."""
        blocks = iter(self.tables[seq_id])
        self.tables[seq_id] = [RELEASED if b == RELEASED else next(blocks) for b in layout]

    # ---- prefix caching (pagedjax.core.prefix_cache overrides; without it nothing is cached) -------
    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        return 0

    def commit_full_blocks(self, seq_id: int, token_ids, num_computed: int) -> None:
        pass

    def drop_cache(self) -> None:
        """Forget every cached block's contents (the device pool was lost: pagedjax.worker.faults)."""

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The host tier's copies for the next step: (block, host slot) out, (host slot, block)
        in (pagedjax.core.host_cache; none without it)."""
        return [], []

    def _release(self, b: int) -> None:
        self.free_blocks[b] = None

    def _take(self) -> int:
        b, _ = self.free_blocks.popitem(last=False)
        self.ref_counts[b] = 1
        return b

    # ---- invariants (tests) --------------------------------------------------------------
    def check_invariants(self) -> None:
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                if b != RELEASED:
                    refs[b] += 1
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is twice in the free list"
        for b in range(self.num_blocks):
            assert refs[b] == self.ref_counts[b], f"block {b}: ref count {self.ref_counts[b]} != {refs[b]} uses"
            assert (b in free) == (refs[b] == 0), f"block {b}: free={b in free} but {refs[b]} uses"

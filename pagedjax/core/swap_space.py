"""Host-side bookkeeping of the swap space: which host slots hold which swapped sequence's blocks.

Plain Python, like the device ``BlockManager`` it mirrors. The host pool is cut into *pieces* of
``piece_blocks`` device blocks (``pagedjax.worker.swap`` says why: one device->host transfer fills one
whole piece). A host ``BlockManager`` whose block is one piece keeps the free list and the reference
counts; a swapped sequence owns ``ceil(n / piece_blocks)`` pieces for its ``n`` device blocks, and
device block ``i`` of its table lives in host slot ``piece[i // P] * P + i % P``.

Check-then-act pairs, as in the block manager: ``can_swap_out`` / ``swap_out`` and
``can_swap_in`` / ``swap_in``; each act returns the ``(src, dst)`` block pairs the device must move
before the next step (device block -> host slot on the way out, host slot -> device block on the
way in). A sequence swapped out of blocks it shared (a fork) comes back with its own copies.
Released entries of a bounded-KV table (``RELEASED``) are neither moved nor held: the sequence
comes back with them released.

The pool is the whole host tier: with ``--kv-offloading-size`` the host prefix cache
(``pagedjax.core.host_cache``) borrows pieces too (``take_piece`` / ``release_piece``, each under
its own owner ``(CACHED, piece)`` in the host block manager's tables), and a swap-out that finds
no free piece evicts cached ones, least recently used first: a swapped sequence is live state,
a cached block only saves a recompute.
"""
from __future__ import annotations

from pagedjax.core.block_manager import RELEASED, BlockManager
from pagedjax.core.sequence import Sequence

CACHED = "host prefix cache"  # owner tag of the pieces the host prefix cache holds


class SwapSpace:
    def __init__(self, num_pieces: int, piece_blocks: int, block_size: int):
        if num_pieces < 1 or piece_blocks < 1:
            raise ValueError(f"need num_pieces >= 1 and piece_blocks >= 1, got {num_pieces}, "
                             f"{piece_blocks}")
        self.piece_blocks = piece_blocks
        self.block_size = block_size
        self.bm = BlockManager(num_pieces, piece_blocks * block_size)  # one "block" = one piece
        self.num_blocks: dict[int, int] = {}  # seq_id -> device blocks it had when swapped out
        self.layouts: dict[int, list[int]] = {}  # seq_id -> its table, RELEASED where it was
        self.cache = None  # the HostPrefixCache sharing the pool, which sets itself here

    @property
    def num_pieces(self) -> int:
        return self.bm.num_blocks

    @property
    def usage(self) -> float:
        return self.bm.usage

    def slots(self, seq_id: int) -> list[int]:
        """Host slots of a swapped sequence's blocks, in table order."""
        p, pieces = self.piece_blocks, self.bm.table(seq_id)
        return [pieces[i // p] * p + i % p for i in range(self.num_blocks.get(seq_id, 0))]

    @staticmethod
    def is_cache_owner(owner) -> bool:
        return isinstance(owner, tuple) and owner[0] == CACHED

    def _pieces_for(self, num_blocks: int) -> int:
        return -(-num_blocks // self.piece_blocks)

    # ---- the host prefix cache's pieces ----------------------------------------------------------
    def take_piece(self) -> int:
        piece = next(iter(self.bm.free_blocks))  # the one append_slots takes (least recently freed)
        self.bm.append_slots((CACHED, piece), 0, self.bm.block_size)
        return piece

    def release_piece(self, piece: int) -> None:
        self.bm.free((CACHED, piece))

    # ---- out -----------------------------------------------------------------------------
    def can_swap_out(self, device: BlockManager, seq_id: int) -> bool:
        n = sum(b != RELEASED for b in device.table(seq_id))
        evictable = self.cache.num_pieces if self.cache is not None else 0
        return n > 0 and self._pieces_for(n) <= self.bm.num_free + evictable

    def swap_out(self, device: BlockManager, seq_id: int) -> list[tuple[int, int]]:
        """Move the sequence's blocks to host slots; its device blocks are freed (the caller's
        gather must read them before anything writes there)."""
        self.layouts[seq_id] = list(device.table(seq_id))
        table = [b for b in self.layouts[seq_id] if b != RELEASED]
        if not table or seq_id in self.num_blocks:
            raise RuntimeError(f"swap_out: sequence {seq_id} has no device blocks or is swapped")
        while (self.bm.num_free < self._pieces_for(len(table)) and self.cache is not None
               and self.cache.evict()):
            pass
        self.bm.append_slots(seq_id, 0, len(table) * self.block_size)
        self.num_blocks[seq_id] = len(table)
        pairs = list(zip(table, self.slots(seq_id)))
        device.free(seq_id)
        return pairs

    # ---- in ------------------------------------------------------------------------------
    def can_swap_in(self, device: BlockManager, seq: Sequence, num_new_tokens: int) -> bool:
        """Room on the device for the swapped blocks plus the next ``num_new_tokens``."""
        layout = self.layouts[seq.seq_id]
        grow = device.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(layout)
        return self.num_blocks[seq.seq_id] + max(grow, 0) <= device.num_free

    def swap_in(self, device: BlockManager, seq_id: int) -> list[tuple[int, int]]:
        """Fresh device blocks for the sequence (released entries stay released); its host
        pieces are freed (the caller's transfer reads them before this step ends)."""
        slots, layout = self.slots(seq_id), self.layouts[seq_id]
        device.append_slots(seq_id, 0, len(slots) * self.block_size)
        fresh = list(device.table(seq_id))
        if len(layout) != len(slots):
            device.restore_released(seq_id, layout)
        self.free(seq_id)
        return list(zip(slots, fresh))

    def free(self, seq_id: int) -> None:
        """Drop a swapped sequence (abort): its pieces go back to the free list."""
        self.num_blocks.pop(seq_id, None)
        self.layouts.pop(seq_id, None)
        self.bm.free(seq_id)

    def check_invariants(self) -> None:
        self.bm.check_invariants()
        swapped = {o for o in self.bm.tables if not self.is_cache_owner(o)}
        assert set(self.num_blocks) == swapped, "swapped seqs != host tables"
        if self.cache is not None:
            self.cache.check_invariants()
        for seq_id, n in self.num_blocks.items():
            assert len(self.bm.table(seq_id)) == -(-n // self.piece_blocks), f"seq {seq_id}: pieces"

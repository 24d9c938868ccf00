"""The host tier of the prefix cache (``--kv-offloading-size``): full blocks evicted from the GPU
prefix cache keep their K/V in host memory, found again by the same chained block hash, and come
back by copy instead of being recomputed.

One host tier: the cache lives in the pieces of the swap space's host pool (``SwapSpace``), and a
swapped-out sequence may take the room of cached pieces (least recently used first), never the
other way round. Plain Python, like the block manager that drives it:

* ``stage``: the GPU prefix cache evicts a hashed block (``PrefixCachingBlockManager._take``).
  Its K/V are still on the device: the step about to be dispatched overwrites them, so the copy
  to the host must run before that step. Staged blocks wait for the end of the schedule.
* ``take_transfers``: at the end of ``Scheduler.schedule``: the step's staged blocks get host
  slots (``P`` blocks a fresh piece, since a transfer writes a whole piece: the last piece of a
  step may be part empty) and become findable; returns the step's device -> host copies
  ``(block, slot)`` and host -> device loads ``(slot, block)``, which the worker dispatches before
  the step, copies first (``pagedjax.worker.swap.HostKVPool.execute``).
* ``lookup`` / ``load``: a prefix match that misses on the GPU continues its hash chain here; a hit
  gets a fresh GPU block and a load into it. The load always runs, even if the request is not
  admitted after all: the block is registered in the GPU cache at once, and the step that could
  read it comes after the load in stream order.
* LRU by piece: a hit refreshes its piece; when the tier is full the least recently used piece
  goes, with every block in it. A key already on the host is not copied again.

A hit is checked against the stored token ids, as on the GPU: a hash collision costs a miss.
After a failed device step (``drop_cache``) every cached piece is dropped: a copy in flight then
may have read a poisoned pool.
"""
from __future__ import annotations

from collections import OrderedDict

from pagedjax.core.swap_space import SwapSpace


class HostPrefixCache:
    def __init__(self, space: SwapSpace):
        self.space = space
        self.piece_blocks = space.piece_blocks
        space.cache = self  # a swap-out may evict cached pieces
        self.index: dict[int, int] = {}  # key -> host slot
        self.entries: dict[int, tuple[int, tuple[int, ...]]] = {}  # slot -> (key, tokens)
        self.lru: OrderedDict[int, list[int]] = OrderedDict()  # piece -> its slots, LRU first
        self.staged: list[tuple[int, tuple[int, ...], int]] = []  # (key, tokens, device block)
        self.loads: list[tuple[int, int]] = []  # (host slot, device block) for the next step
        self.queries = self.hits = 0  # tokens looked up here (GPU misses) and found

    @property
    def num_pieces(self) -> int:
        return len(self.lru)

    @property
    def num_blocks(self) -> int:
        return len(self.index)

    @property
    def usage(self) -> float:
        """Share of the host tier's pieces that hold cached blocks."""
        return len(self.lru) / self.space.num_pieces

    # ---- the block manager's side ------------------------------------------------------------
    def lookup(self, key: int, tokens: tuple[int, ...]) -> int | None:
        slot = self.index.get(key)
        if slot is None or self.entries[slot][1] != tokens:
            return None
        self.lru.move_to_end(slot // self.piece_blocks)
        return slot

    def load(self, slot: int, block: int) -> None:
        self.loads.append((slot, block))

    def stage(self, key: int, tokens: tuple[int, ...], block: int) -> None:
        slot = self.index.get(key)
        if slot is not None:  # already on the host (it was loaded from here): no second copy
            self.lru.move_to_end(slot // self.piece_blocks)
        else:
            self.staged.append((key, tokens, block))

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's copies: (device block, host slot) out, (host slot, device block) in."""
        staged, self.staged = self.staged, []
        loads, self.loads = self.loads, []
        p = self.piece_blocks
        # pieces free or held by blocks cached before this step (those are evicted first, so no
        # piece filled now is evicted again now); what does not fit is lost, as without the tier
        room = self.space.bm.num_free + len(self.lru)
        stores = []
        for at in range(0, min(len(staged), room * p), p):
            if not self.space.bm.num_free:
                self.evict()
            piece = self.space.take_piece()
            slots = []
            for row, (key, tokens, block) in enumerate(staged[at:at + p]):
                slot = piece * p + row
                self.index[key] = slot
                self.entries[slot] = (key, tokens)
                stores.append((block, slot))
                slots.append(slot)
            self.lru[piece] = slots
        return stores, loads

    # ---- room ----------------------------------------------------------------------------------
    def evict(self) -> bool:
        """The least recently used piece goes back to the host pool; False if none is cached."""
        if not self.lru:
            return False
        piece, slots = self.lru.popitem(last=False)
        for slot in slots:
            key, _ = self.entries.pop(slot)
            del self.index[key]
        self.space.release_piece(piece)
        return True

    def clear(self) -> None:
        """Forget everything (a failed device step): cached pieces go back, nothing is pending."""
        while self.evict():
            pass
        self.staged.clear()
        self.loads.clear()

    def check_invariants(self) -> None:
        assert len(self.index) == len(self.entries), "index and entries disagree"
        for key, slot in self.index.items():
            assert self.entries[slot][0] == key, f"slot {slot} holds another key"
            assert slot // self.piece_blocks in self.lru, f"slot {slot}: its piece is not cached"
        held = {o[1] for o in self.space.bm.tables if SwapSpace.is_cache_owner(o)}
        assert held == set(self.lru), "cached pieces != pieces the host pool lends the cache"

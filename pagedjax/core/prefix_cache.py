"""Automatic prefix caching: full blocks are remembered by their content and reused.

A full block's key is a hash chained from its parent block's key and its own token ids (the
chain starts from a salt naming the model, so the key covers everything before the block). A
freed block keeps its key while it sits in the free list; it is evicted only when the free list
hands it out again, least recently freed first, and ``free`` releases a sequence's tail first,
so a finished sequence's tail goes before its shared prefix. A hit is checked against the
stored token ids, so a hash collision costs a miss, never wrong K/V.

With a host tier (``host``: ``pagedjax.core.host_cache``) an evicted block's K/V are copied to
host memory before the step that overwrites it, and a lookup that misses here asks the host
tier: a hit there takes a fresh block and a copy back (see that module).
"""
from __future__ import annotations

from pagedjax.core.block_manager import RELEASED, BlockManager
from pagedjax.core.host_cache import HostPrefixCache


class PrefixCachingBlockManager(BlockManager):
    def __init__(self, num_blocks: int, block_size: int, salt: int = 0,
                 host: HostPrefixCache | None = None):
        super().__init__(num_blocks, block_size)
        self.salt = salt
        self.host = host
        self.cached: dict[int, int] = {}  # key -> block
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (key, tokens)
        self.keys: dict[int, list[int]] = {}  # seq -> keys of its committed full blocks

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Attach the cached blocks of the longest cached prefix of ``token_ids`` to a sequence
        that holds no blocks; returns the number of tokens now in the cache (blocks found on
        the host tier count: their load runs before the step that reads them). At least one
        token is always left to compute, so the step has a row to sample from."""
        if self.tables.get(seq_id):
            raise RuntimeError(f"match_prefix: sequence {seq_id} already has blocks")
        bs, parent, table, keys = self.block_size, self.salt, [], []
        full = (len(token_ids) - 1) // bs
        on_device = 0
        for i in range(full):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            key = hash((parent, tokens))
            block = self.cached.get(key)
            if block is not None and self.block_key[block][1] == tokens:
                if self.ref_counts[block] == 0:
                    del self.free_blocks[block]
                self.ref_counts[block] += 1
                on_device += 1
            else:
                block = self._load(key, tokens)
                if block is None:
                    break
            table.append(block)
            keys.append(key)
            parent = key
        self.queries += full * bs
        self.hits += on_device * bs
        if self.host is not None:
            self.host.queries += (full - on_device) * bs
            self.host.hits += (len(table) - on_device) * bs
        if table:
            self.tables[seq_id], self.keys[seq_id] = table, keys
        return len(table) * bs

    def _load(self, key: int, tokens: tuple[int, ...]) -> int | None:
        """A fresh block that the host tier's copy of ``key`` is loaded into, or None."""
        slot = self.host.lookup(key, tokens) if self.host is not None and self.num_free else None
        if slot is None:
            return None
        block = self._take()
        self.cached[key] = block
        self.block_key[block] = (key, tokens)
        self.host.load(slot, block)
        return block

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return self.host.take_transfers() if self.host is not None else ([], [])

    def commit_full_blocks(self, seq_id: int, token_ids, num_computed: int) -> None:
        """Register the sequence's blocks that are now full and computed. ``token_ids(a, b)``
        returns the tokens at positions a..b-1."""
        keys = self.keys.setdefault(seq_id, [])
        table = self.tables.get(seq_id, [])
        bs = self.block_size
        for i in range(len(keys), min(num_computed // bs, len(table))):
            tokens = tuple(token_ids(i * bs, (i + 1) * bs))
            key = hash((keys[-1] if keys else self.salt, tokens))
            keys.append(key)
            # a released block (bounded KV) is not cached: the chain through it stays broken,
            # so no later block of it is ever matched either
            if key not in self.cached and table[i] != RELEASED:
                self.cached[key] = table[i]
                self.block_key[table[i]] = (key, tokens)

    def drop_cache(self) -> None:
        self.cached.clear()
        self.block_key.clear()
        if self.host is not None:
            self.host.clear()

    def fork(self, parent_id: int, child_id: int) -> None:
        super().fork(parent_id, child_id)
        self.keys[child_id] = list(self.keys.get(parent_id, []))

    def free(self, seq_id: int) -> None:
        self.keys.pop(seq_id, None)
        super().free(seq_id)

    def _take(self) -> int:
        block = super()._take()
        key, tokens = self.block_key.pop(block, (None, None))
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]  # evicted: the least recently freed cached block
            if self.host is not None:
                self.host.stage(key, tokens, block)
        return block

    def check_invariants(self) -> None:
        super().check_invariants()
        for key, block in self.cached.items():
            assert self.block_key[block][0] == key, f"block {block} is cached under another key"

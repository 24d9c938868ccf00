"""The host tier of the prefix cache (``--kv-offloading-size``): blocks evicted from a small GPU
pool come back from host memory bit-exact (greedy outputs identical with the tier on and off,
fewer tokens computed), through swap preemption sharing the tier and under tensor parallelism
(each device moves its shard); the block manager and the host
tier keep every block's contents right under random admissions, frees and swap-outs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from pagedjax import LLM
from pagedjax.config import EngineArgs
from pagedjax.core.host_cache import HostPrefixCache
from pagedjax.core.prefix_cache import PrefixCachingBlockManager
from pagedjax.core.swap_space import SwapSpace
from tests.conftest import assert_no_leak
from tests.engine.test_prefix_cache import multi_turn

# 16 blocks of 16 tokens hold about three of the five chats' histories (73-150 tokens): each
# turn evicts the others' prefixes, which the next turn finds on the host tier
ENGINE = dict(num_gpu_blocks_override=16, max_model_len=256, max_num_batched_tokens=64,
              enable_prefix_caching=True)
TIER = dict(kv_offloading_size=1.0, num_cpu_blocks_override=64)


def _bf16(model):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    return dataclasses.replace(model, params=params, dtype="bfloat16")


# both models, both KV dtypes, both preemption modes and tp 1 and 2 in two runs (each run
# builds two engines)
@pytest.mark.parametrize("model,kv,mode,tp", [("tiny_qwen", "bf16", "recompute", 1),
                                              ("tiny_llama", "fp8", "swap", 2)])
def test_greedy_identical_with_the_tier_on_and_off(model, kv, mode, tp, request):
    model = request.getfixturevalue(model)
    model = _bf16(model) if kv == "bf16" else model
    kw = dict(ENGINE, kv_cache_dtype="auto" if kv == "bf16" else "fp8", preemption_mode=mode)
    off = LLM(loaded=model, **kw, **({"swap_space": 1.0} if mode == "swap" else {}))
    on = LLM(loaded=model, **kw, **TIER, tensor_parallel_size=tp)
    e = on.engine
    shards = {x.sharding.memory_kind for x in jax.tree.leaves(e.host_pool.pieces[0])}
    assert shards == {"pinned_host"} and len(jax.tree.leaves(e.runner.pool)[0].devices()) == tp
    compiled = e.host_pool.num_compilations
    assert multi_turn(on, turns=3, chats=5) == multi_turn(off, turns=3, chats=5)
    snap = (e.host_pool.wait(), e.make_stats())[1]
    assert snap.kv_offload_hits > 0 and snap.kv_offload_hits <= snap.kv_offload_queries
    assert snap.kv_offload_store_blocks > 0 and snap.kv_offload_load_blocks > 0
    assert snap.kv_offload_load_payload_bytes == snap.kv_offload_load_blocks * e.spec.bytes_per_block
    assert snap.kv_offload_blocks > 0 and 0 < snap.kv_offload_usage <= snap.cpu_cache_usage
    assert e.stats.computed_tokens < off.engine.stats.computed_tokens, "no prefill was skipped"
    if mode == "swap":
        assert e.scheduler.num_preemptions_swap > 0, "the run was meant to swap"
    assert e.host_pool.num_compilations == compiled, "the tier's transfers must not compile"
    assert_no_leak(on)
    e.swap_space.check_invariants()
    assert not e.swap_space.num_blocks, "a swapped sequence was left behind"


def test_the_tier_needs_prefix_caching_and_a_size():
    with pytest.raises(ValueError, match="needs --enable-prefix-caching"):
        EngineArgs(kv_offloading_size=4)
    with pytest.raises(ValueError, match="--kv-offloading-size -1"):
        EngineArgs(kv_offloading_size=-1, enable_prefix_caching=True)


BS, P = 4, 2
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12, [5] * 16]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 9)),
                min_size=1, max_size=60))
def test_host_tier_keeps_every_block_right(ops):
    """Admissions of prompts on a few shared prefixes, frees, swap-outs and drops of swapped
    sequences against a block manager of 8 blocks and a host tier of 4 pieces of 2 blocks. Each
    op ends with a step: the scheduler's copies run as the worker runs them (the host pieces a
    load reads are taken before any store replaces a piece whole; stores before loads), then the
    step writes the computed tokens. After it every cached block, on the device or the host,
    holds its key's tokens; every live sequence's blocks hold its tokens; nothing leaks."""
    space = SwapSpace(num_pieces=4, piece_blocks=P, block_size=BS)
    host = HostPrefixCache(space)
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=BS, salt=1, host=host)
    device: dict[int, tuple] = {}  # block -> the tokens whose K/V it holds
    hostmem: dict[int, tuple] = {}  # host slot -> the same
    live: dict[int, list[int]] = {}
    swapped: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
    next_id = 0

    def step(swap_out=(), computed=None):
        stores, loads = bm.take_transfers()
        before = dict(hostmem)
        for pairs in (swap_out, stores):  # a piece is written whole: its other rows are lost
            for piece in {slot // P for _, slot in pairs}:
                for r in range(P):
                    hostmem.pop(piece * P + r, None)
            for block, slot in pairs:
                hostmem[slot] = device.get(block)
        for slot, block in loads:
            device[block] = before.get(slot)
        if computed is not None:
            sid, start = computed
            toks, table = live[sid], bm.table(sid)
            for i in range(start // BS, len(table)):
                device[table[i]] = tuple(toks[i * BS:(i + 1) * BS])

    for op, which, n in ops:
        if op == 0:  # admit a prompt sharing a prefix
            toks = PREFIXES[which] + [which + 20] * n
            got = bm.match_prefix(next_id, toks)
            if bm.can_append(next_id, got, len(toks) - got):
                bm.append_slots(next_id, got, len(toks) - got)
                live[next_id] = toks
                step(computed=(next_id, got))
                bm.commit_full_blocks(next_id, lambda a, z, t=toks: t[a:z], len(toks))
            else:
                bm.free(next_id)
                step()
            next_id += 1
        elif op == 1 and live:
            sid = sorted(live)[which % len(live)]
            bm.free(sid)
            del live[sid]
            step()
        elif op == 2 and live:  # swap out: may evict cached pieces, never the other way round
            sid = sorted(live)[which % len(live)]
            if space.can_swap_out(bm, sid):
                toks = live.pop(sid)
                pairs = space.swap_out(bm, sid)
                swapped[sid] = (toks, pairs)
                step(swap_out=pairs)
        elif op == 3 and swapped:
            sid = sorted(swapped)[which % len(swapped)]
            space.free(sid)
            del swapped[sid]
            step()
        bm.check_invariants()
        space.check_invariants()
        for key, block in bm.cached.items():
            assert device.get(block) == bm.block_key[block][1], f"GPU block {block}: wrong K/V"
        for slot, (key, tokens) in host.entries.items():
            assert hostmem.get(slot) == tokens, f"host slot {slot}: wrong K/V"
        for sid, toks in live.items():
            for i, b in enumerate(bm.table(sid)):
                if (i + 1) * BS <= len(toks):
                    assert device[b] == tuple(toks[i * BS:(i + 1) * BS]), "a live block changed"
        for sid, (toks, pairs) in swapped.items():
            for i, (_, slot) in enumerate(pairs):
                if (i + 1) * BS <= len(toks):
                    assert hostmem.get(slot) == tuple(toks[i * BS:(i + 1) * BS]), "swapped"
    for sid in list(live):
        bm.free(sid)
    for sid in list(swapped):
        space.free(sid)
    host.clear()
    assert bm.num_free == bm.num_blocks and space.bm.num_free == space.num_pieces


def test_a_swap_out_takes_the_room_of_cached_blocks():
    """One host tier: with every piece holding cached blocks, a swap-out still finds room, by
    evicting the least recently used cached pieces (and the cache never evicts a swapped one)."""
    space = SwapSpace(num_pieces=3, piece_blocks=P, block_size=BS)
    host = HostPrefixCache(space)
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=BS, salt=1, host=host)
    for sid, toks in enumerate(([1] * 8, [2] * 8, [3] * 8, [4] * 8)):  # 4 x 2 blocks, pool 8
        bm.append_slots(sid, 0, len(toks))
        bm.commit_full_blocks(sid, lambda a, z, t=toks: t[a:z], len(toks))
        bm.free(sid)
    bm.append_slots(9, 0, 6 * BS)  # takes the 6 least recently freed: the first 3 prompts
    stores, _ = bm.take_transfers()
    assert len(stores) == 6 and host.num_pieces == 3 and space.bm.num_free == 0
    bm.free(9)
    bm.append_slots(10, 0, 3 * BS)
    assert space.can_swap_out(bm, 10)
    space.swap_out(bm, 10)
    assert space.bm.num_free == 0 and host.num_pieces == 1, "two cached pieces make room"
    assert host.lookup(hash((hash((1, (3,) * BS)), (3,) * BS)), (3,) * BS) is not None, \
        "the most recently stored piece stays"
    bm.take_transfers()
    space.check_invariants()
    assert space.bm.table(10), "the swapped sequence holds its pieces"

"""Preemption by swap: KV blocks go to a host pool and come back bit-exact; outputs never change;
nothing is lost, duplicated or leaked under any mix of swap and recompute."""
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, event, given, settings, strategies as st

from pagedjax import LLM, SamplingParams
from pagedjax.core.block_manager import BlockManager
from pagedjax.config import EngineArgs
from pagedjax.worker.kv_pool import KVPoolSpec, allocate
from pagedjax.core.scheduler import Scheduler
from pagedjax.core.sequence import Status
from pagedjax.worker import swap
from pagedjax.worker.swap import HostKVPool, group_sizes, make_swap_space, piece_blocks_for
from pagedjax.core.swap_space import SwapSpace
from tests.conftest import assert_no_leak
from tests.engine.test_block_manager import host_request, sampled

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
# 16 blocks x 16 tokens hold about two of these sequences (40-80 + 40 tokens, up to 8 blocks),
# so running ones preempt each other; max_model_len 256 gives host pieces of 2 blocks (16 // 8).
# One engine serves every engine test here: a fresh one would compile its step shapes again.
ENGINE = dict(block_size=16, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=6)


def _prompts(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, size=int(k)).tolist() for k in rng.integers(40, 81, size=n)]


def assert_swap_pools_free(llm) -> None:
    assert_no_leak(llm)
    space = llm.engine.swap_space
    space.check_invariants()
    assert space.bm.num_free == space.num_pieces, "host pieces leaked"
    assert not llm.engine.scheduler.swapped


@pytest.fixture(scope="module")
def swap_llm(tiny_qwen):
    return LLM(loaded=tiny_qwen, num_gpu_blocks_override=16, preemption_mode="swap",
               num_cpu_blocks_override=64, **ENGINE)


@pytest.fixture(scope="module")
def reference(swap_llm):
    """Each prompt alone: the same engine, never preempting."""
    outs = [swap_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
            for p in _prompts()]
    assert swap_llm.engine.scheduler.num_preemptions == 0
    return outs


def _preemptions(llm):
    s = llm.engine.scheduler
    return s.num_preemptions_swap, s.num_preemptions_recompute


def test_swap_preemption_outputs_match_no_preemption(swap_llm, reference):
    llm = swap_llm
    compiled = llm.engine.host_pool.num_compilations
    (swap0, rec0), stats = _preemptions(llm), llm.engine.host_pool.stats
    outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    swaps, recomputes = (b - a for a, b in zip((swap0, rec0), _preemptions(llm)))
    assert swaps >= 3 and recomputes == 0
    assert stats.blocks["out"] == stats.blocks["in"] > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert llm.engine.host_pool.num_compilations == compiled, "swap shapes must not compile"
    snap = llm.engine.make_stats()
    assert snap.num_swapped == 0 and snap.cpu_cache_usage == 0.0
    assert_swap_pools_free(llm)


def test_full_host_pool_falls_back_to_recompute_and_logs(swap_llm, reference, caplog):
    llm, space = swap_llm, swap_llm.engine.swap_space
    # Someone else holds all but 4 pieces (8 blocks) of the host pool: room for one swapped
    # sequence at a time, so other victims are recomputed.
    space.bm.append_slots(-1, 0, (space.num_pieces - 4) * space.bm.block_size)
    swap0, rec0 = _preemptions(llm)
    with caplog.at_level(logging.INFO):
        outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
        llm.engine.host_pool.wait()  # the last swap's line is written when its data has landed
    space.bm.free(-1)
    swaps, recomputes = (b - a for a, b in zip((swap0, rec0), _preemptions(llm)))
    assert swaps > 0 and recomputes > 0
    assert "host swap pool full: preempting seq" in caplog.text
    assert "Swapping out" in caplog.text and "Swapping in" in caplog.text
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert_swap_pools_free(llm)


def test_abort_of_swapped_request_frees_host_blocks(swap_llm):
    engine = swap_llm.engine
    for i, p in enumerate(_prompts(seed=1)):
        engine.add_request(f"a{i}", p, GREEDY)
    for _ in range(500):
        engine.step()
        if engine.make_stats().num_swapped:
            break
    engine.host_pool.wait()  # the snapshot counts a swap once it has landed
    snap = engine.make_stats()
    assert snap.num_swapped, "the workload was meant to swap"
    assert snap.cpu_cache_usage > 0 and snap.swap_out_blocks > 0
    victim = engine.scheduler.swapped[0]
    assert victim.status is Status.SWAPPED
    engine.abort(victim.request_id)
    assert victim.finished and victim not in engine.scheduler.swapped
    assert victim.seq_id not in engine.swap_space.bm.tables
    while engine.has_unfinished():
        engine.step()
    assert_swap_pools_free(swap_llm)


TRANSFERS = {  # how the bytes travel -> expected .transfers
    "in-program": "in the swap programs",
    "device_put": "jax.device_put",  # neither direction compiles transfers into a program
    "numpy": "numpy",  # a platform without pinned host memory
    "fallback": "out: in the swap programs, in: jax.device_put",
}


def _no_host_transfers(program, monkeypatch):
    """``swap.<program>`` fails to compile whenever its transfers would run inside it."""
    real = getattr(swap, program)

    def no_host_memory(*args):  # the last argument: the host (or device) shardings, or None
        if args[-1] is None:
            return real(*args)

        def fails(*args):
            raise RuntimeError("host memory in a program is not supported here")
        fails._cache_size = lambda: 0
        return fails
    monkeypatch.setattr(swap, program, no_host_memory)


@pytest.mark.parametrize("dtype,transfers", [("bfloat16", "in-program"), ("float32", "in-program"),
                                             ("bfloat16", "device_put"), ("bfloat16", "numpy"),
                                             ("bfloat16", "fallback")])
def test_swapped_blocks_round_trip_bit_exact(dtype, transfers, monkeypatch, caplog):
    """Random bit patterns (NaN payloads included) out to host pieces and back into other blocks,
    whichever way the bytes travel: inside the swap programs, by ``jax.device_put``, through
    numpy, or by ``jax.device_put`` for the direction whose in-program transfers do not compile."""
    if transfers == "numpy":
        monkeypatch.setattr(swap, "host_memory_kind", lambda: None)
    if transfers in ("fallback", "device_put"):
        _no_host_transfers("_scatter_program", monkeypatch)
    if transfers == "device_put":
        _no_host_transfers("_gather_program", monkeypatch)
    spec = KVPoolSpec(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8,
                      dtype=dtype)
    bits = jnp.uint16 if dtype == "bfloat16" else jnp.uint32
    keys = iter(jax.random.split(jax.random.key(0), 2 * spec.num_layers + 1))
    runner = types.SimpleNamespace(pool=[tuple(
        jax.lax.bitcast_convert_type(jax.random.bits(next(keys), spec.page_shape, bits), dtype)
        for _ in "kv") for _ in range(spec.num_layers)])
    before = [np.asarray(jax.lax.bitcast_convert_type(x, bits)) for kv in runner.pool for x in kv]
    assert allocate(spec)[0][0].shape == runner.pool[0][0].shape

    bm, space = BlockManager(16, 4), SwapSpace(num_pieces=5, piece_blocks=2, block_size=4)
    with caplog.at_level(logging.WARNING):
        host = HostKVPool(spec, space, runner)
    assert host.transfers == TRANSFERS[transfers]
    assert ("swap-in: transfers inside the swap programs failed" in caplog.text) == (
        transfers in ("fallback", "device_put"))
    assert host.sizes == [4, 2, 1] and host.num_compilations == 6
    bm.append_slots(0, 0, 4 * 5)  # 5 blocks: 3 pieces, the last one padded
    bm.append_slots(1, 0, 4 * 2)
    table0 = list(bm.table(0))
    out = space.swap_out(bm, 0) + space.swap_out(bm, 1)
    host.execute(types.SimpleNamespace(swap_out=out, swap_in=[], offload_out=[],
                                       offload_in=[]), runner)
    # At once, as the engine's step does: every device block taken by someone else and
    # overwritten in place by a program that donates the pool the swap-out is still reading.
    bm.append_slots(2, 0, 4 * 16)
    overwrite = jax.jit(lambda pool: [(jnp.zeros_like(k), jnp.full_like(v, 7)) for k, v in pool],
                        donate_argnums=0,  # committed output, like the step's pool
                        out_shardings=jax.tree.map(lambda x: x.sharding, runner.pool))
    runner.pool = overwrite(runner.pool)
    bm.free(2)
    bm.append_slots(3, 0, 4 * 3)  # seq 0 comes back into different blocks
    back = space.swap_in(bm, 0)
    host.execute(types.SimpleNamespace(swap_out=[], swap_in=back, offload_out=[],
                                       offload_in=[]), runner)
    assert sorted(bm.table(0)) != sorted(table0)
    after = [np.asarray(jax.lax.bitcast_convert_type(x, bits)) for kv in runner.pool for x in kv]
    for b_old, b_new in zip(table0, bm.table(0)):
        for x, y in zip(before, after):
            np.testing.assert_array_equal(x[b_old], y[b_new])
    assert host.stats.blocks == {"out": 7, "in": 5, "store": 0, "load": 0}
    assert host.stats.link_bytes["out"] == 4 * host.piece_bytes  # 3 + 1 pieces: one program
    assert [(e.direction, e.pieces, e.programs) for e in host.stats.events] == [
        ("out", 4, 1), ("in", 3, 2)]  # 3 pieces = programs of 2 and 1
    assert all(e.seconds > 0 for e in host.stats.events)
    assert host.num_compilations == 6, "swap programs compile at start only"
    space.free(1)  # seq 1 is dropped while swapped (an abort)
    bm.free(0)
    bm.free(3)
    space.check_invariants()
    assert space.bm.num_free == space.num_pieces and bm.num_free == 16


def test_swap_configuration_errors():
    with pytest.raises(ValueError, match="--swap-space"):
        EngineArgs(preemption_mode="swap")
    spec = KVPoolSpec(num_layers=28, num_blocks=100, block_size=16, num_kv_heads=4, head_dim=128)
    with pytest.raises(ValueError, match="holds no KV block"):
        make_swap_space(EngineArgs(preemption_mode="swap", swap_space=1e-6), spec, 8192)
    assert make_swap_space(EngineArgs(swap_space=4), spec, 8192) is None  # recompute mode
    space = make_swap_space(EngineArgs(preemption_mode="swap", swap_space=1), spec, 8192)
    # Qwen2.5-7B: 896 KiB blocks, pieces of 32 blocks = 28 MiB, 1 GiB = 36 pieces
    assert (space.piece_blocks, space.num_pieces) == (32, 36)
    assert piece_blocks_for(1 << 20, num_cpu_blocks=3, max_blocks_per_seq=4096) == 2
    assert group_sizes(17, [16, 8, 4, 2, 1]) == [16, 1]
    assert group_sizes(12, [16, 8, 4, 2, 1]) == [8, 4]
    assert group_sizes(40, [16, 8, 4, 2, 1]) == [16, 16, 8]
    assert group_sizes(3, [2, 1]) == [2, 1] and group_sizes(0, [1]) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 8),
                          st.one_of(st.none(), st.integers(0, 60))), min_size=2, max_size=12),
       st.integers(6, 20), st.integers(0, 8), st.sampled_from([1, 2, 4]), st.integers(4, 48),
       st.integers(1, 6))
def test_no_request_lost_or_duplicated_under_swap_and_recompute(reqs, num_blocks, host_pieces,
                                                                piece, budget, max_seqs):
    """A fake device that really moves token ids between a device and a host array: every request
    ends with exactly its tokens, every scheduled sequence reads back its whole context, whatever
    mix of swap and recompute the pools force; at the end both pools are all free.
    reqs: (prompt length, max tokens, arrival step, abort step or None)."""
    bs = 4
    assume(max(p + m for p, m, _, _ in reqs) <= num_blocks * bs)  # else refused up front
    bm = BlockManager(num_blocks, bs)
    space = SwapSpace(host_pieces, piece, bs) if host_pieces else None
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, swap_space=space)
    dev = np.full((num_blocks * bs,), -1)
    host = np.full(((host_pieces or 1) * piece * bs,), -1)
    requests = [host_request(str(i), [(7 * i + j) % 50 + 100 for j in range(p)],
                             SamplingParams(max_tokens=m), i)
                for i, (p, m, _, _) in enumerate(reqs)]
    seqs = [r.seqs[0] for r in requests]

    def expected_output(i, k):  # what the fake model samples: a function of (request, position)
        return (13 * i + k) % 89

    for step in range(5000):
        for i, (_, _, arrive, abort) in enumerate(reqs):
            if arrive == step:
                sched.add(requests[i])
            if abort == step and arrive <= step:
                sched.end_request(str(i), "abort")
        if not sched.has_unfinished() and step > max(a for _, _, a, _ in reqs):
            break
        batch = sched.schedule()
        for d, h in batch.swap_out:  # the gather reads freed blocks before anything writes
            host[h * bs:(h + 1) * bs] = dev[d * bs:(d + 1) * bs]
        for h, d in batch.swap_in:
            dev[d * bs:(d + 1) * bs] = host[h * bs:(h + 1) * bs]
        for s, d in batch.copies:
            dev[d * bs:(d + 1) * bs] = dev[s * bs:(s + 1) * bs]
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs), "scheduled twice"
        assert batch.num_tokens <= budget and len(batch.seqs) <= max_seqs
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            end = s.num_computed_tokens  # the scheduler counts the step's tokens as computed
            for pos in range(end - n, end):
                dev[bm.slot(s.seq_id, pos)] = s.token_at(pos)
            assert [dev[bm.slot(s.seq_id, pos)] for pos in range(end)] == s.tokens(0, end)
        if batch:  # a sampling row's PLACEHOLDER is its last output token
            sched.update_from_output(batch, sampled(batch, lambda s, i: expected_output(
                int(s.request_id), len(s.output_token_ids) - 1)))
        bm.check_invariants()
        queues = [list(map(id, q)) for q in (sched.running, sched.waiting, sched.swapped)]
        assert sum(map(len, queues)) == len(set().union(*queues)), "a sequence in two queues"
        for s in sched.swapped:
            assert s.status is Status.SWAPPED and not bm.table(s.seq_id)
            assert space.num_blocks[s.seq_id] == bm.blocks_for(s.num_computed_tokens)
        if space is not None:
            space.check_invariants()
        else:
            assert sched.num_preemptions_swap == 0
    assert not sched.has_unfinished(), "the workload did not drain"
    for i, (s, (_, m, _, abort)) in enumerate(zip(seqs, reqs)):
        if s.finish_reason == "length":
            assert s.output_token_ids == [expected_output(i, k) for k in range(m)]
        else:
            assert s.finish_reason == "abort" and abort is not None
    assert bm.num_free == num_blocks
    assert space is None or space.bm.num_free == host_pieces
    assert sched.num_preemptions == sched.num_preemptions_swap + sched.num_preemptions_recompute
    event(f"swap={sched.num_preemptions_swap > 0} recompute={sched.num_preemptions_recompute > 0}")

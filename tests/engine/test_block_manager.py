"""Block manager and scheduler invariants, by property tests over random workloads."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagedjax.core.block_manager import RELEASED, BlockManager
from pagedjax.outputs import RequestMetrics
from pagedjax.core.request import Request
from pagedjax.worker.runner import StepResult
from pagedjax.sampling_params import SamplingParams
from pagedjax.core.scheduler import Scheduler
from pagedjax.core.sequence import Sequence
from pagedjax.core.swap_space import SwapSpace


def host_request(request_id: str, prompt: list[int], params: SamplingParams, arrival: int):
    """A one-sample request as the engine queues it, without a tokenizer."""
    seq = Sequence(request_id, prompt, params, arrival, seed=0)
    return Request(request_id, None, prompt, params, [seq], [None], RequestMetrics(0.0),
                   max_tokens=params.max_tokens, stream=False)


def sampled(batch, token_of) -> StepResult:
    """What a device step would return: token_of(seq, row) for each sampling row."""
    rows = [*batch.seqs, *(child for _, child in batch.forks)]
    tokens = np.asarray([token_of(s, i) for i, s in enumerate(rows)], np.int32)
    return StepResult(tokens, np.zeros(len(rows), np.float32), None, None)


def test_append_fork_copy_on_write_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.append_slots(0, 0, 6) == []  # 6 tokens: 2 blocks
    assert len(bm.table(0)) == 2
    bm.fork(0, 1)
    assert bm.ref_counts[bm.table(0)[1]] == 2
    # seq 1 writes token 6 into the shared, partly filled block 1: copied first
    src = bm.table(1)[1]
    copies = bm.append_slots(1, 6, 1)
    assert copies == [(src, bm.table(1)[1])] and bm.table(1)[0] == bm.table(0)[0]
    assert bm.slot(1, 6) == bm.table(1)[1] * 4 + 2
    bm.check_invariants()
    bm.free(0)
    bm.free(1)
    bm.check_invariants()
    assert bm.num_free == 8


def test_append_without_room_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_append(0, 0, 9)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append_slots(0, 0, 9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 9)), max_size=60))
def test_block_manager_invariants_under_random_ops(ops):
    bm = BlockManager(num_blocks=12, block_size=4)
    lens: dict[int, int] = {}
    next_id = 0
    for op, which, n in ops:
        ids = sorted(lens)
        if op == 0 or not ids:  # new sequence
            if bm.can_append(next_id, 0, n):
                bm.append_slots(next_id, 0, n)
                lens[next_id] = n
                next_id += 1
        else:
            sid = ids[which % len(ids)]
            if op == 1 and bm.can_append(sid, lens[sid], n):
                bm.append_slots(sid, lens[sid], n)
                lens[sid] += n
            elif op == 2:
                bm.fork(sid, next_id)
                lens[next_id] = lens[sid]
                next_id += 1
            elif op == 3:
                bm.free(sid)
                del lens[sid]
        bm.check_invariants()
        for sid, length in lens.items():
            assert len(bm.table(sid)) == bm.blocks_for(length)
    for sid in list(lens):
        bm.free(sid)
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=14),
       st.integers(8, 30), st.integers(4, 64), st.integers(1, 6))
def test_scheduler_never_loses_or_duplicates(reqs, num_blocks, budget, max_seqs):
    """A fake device step: every request finishes with exactly its max_tokens, whatever the
    pool, budget and preemptions; afterwards every block is free."""
    block_size = 4
    if max(p + m for p, m in reqs) > num_blocks * block_size:
        return  # the engine refuses such a request up front
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    requests = [host_request(str(i), [1] * p, SamplingParams(max_tokens=m, ignore_eos=True), i)
                for i, (p, m) in enumerate(reqs)]
    for r in requests:
        sched.add(r)
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs), "scheduled twice"
        assert batch.num_tokens <= budget and len(batch.seqs) <= max_seqs
        if batch:
            sched.update_from_output(batch, sampled(batch, lambda s, i: 2))
        bm.check_invariants()
        assert set(map(id, sched.running)).isdisjoint(map(id, sched.waiting))
    assert not sched.has_unfinished(), "the workload did not drain"
    assert [r.seqs[0].output_token_ids for r in requests] == [[2] * m for _, m in reqs]
    assert all(r.seqs[0].finish_reason == "length" for r in requests) and not sched.requests
    assert bm.num_free == num_blocks


# ---- bounded KV: sinks + window ---------------------------------------------------------------
def released_ok(bm, table, released_to: int) -> bool:
    """Exactly the blocks past the sinks and wholly before the window of position released_to
    are RELEASED."""
    bs, s, w = bm.block_size, bm.sink_tokens, bm.window
    return all((b == RELEASED) == (i * bs >= s and (i + 1) * bs <= released_to - w)
               for i, b in enumerate(table))


def test_release_outside_window_keeps_sinks_and_window():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.set_window(5, 8)  # sinks: blocks 0 and 1 (positions 0..7 hold the 5 sink tokens)
    bm.append_slots(0, 0, 30)  # 8 blocks
    bm.release_outside_window(0, 30)  # window 22..29: blocks 2..4 (positions 8..19) go
    assert bm.table(0)[:2] != [RELEASED] * 2 and bm.table(0)[2:5] == [RELEASED] * 3
    assert RELEASED not in bm.table(0)[5:] and bm.num_free == 16 - 5
    bm.fork(0, 1)
    bm.release_outside_window(1, 34)  # block 5 (20..23): released by seq 1, still seq 0's
    assert bm.table(1)[5] == RELEASED and bm.table(0)[5] != RELEASED and bm.num_free == 11
    bm.check_invariants()
    bm.free(0)
    bm.free(1)
    bm.check_invariants()
    assert bm.num_free == 16


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(1, 9)), max_size=60),
       st.integers(0, 6), st.integers(4, 10))
def test_block_manager_invariants_with_releases(ops, sink, window):
    """Random appends, forks, frees and releases: no block lost or double-owned, the released
    entries exactly those the window rule names, a sequence's blocks in use bounded."""
    bm = BlockManager(num_blocks=12, block_size=4)
    bm.set_window(sink, window)
    lens: dict[int, int] = {}
    released_to: dict[int, int] = {}
    next_id = 0
    for op, which, n in ops:
        ids = sorted(lens)
        if op == 0 or not ids:
            if bm.can_append(next_id, 0, n):
                bm.append_slots(next_id, 0, n)
                lens[next_id], released_to[next_id] = n, 0
                next_id += 1
            continue
        sid = ids[which % len(ids)]
        if op == 1 and bm.can_append(sid, lens[sid], n):
            bm.append_slots(sid, lens[sid], n)
            lens[sid] += n
        elif op == 2:
            bm.fork(sid, next_id)
            lens[next_id], released_to[next_id] = lens[sid], released_to[sid]
            next_id += 1
        elif op == 3:
            bm.free(sid)
            del lens[sid], released_to[sid]
        elif op == 4:
            bm.release_outside_window(sid, lens[sid])
            released_to[sid] = lens[sid]
            live = sum(b != RELEASED for b in bm.table(sid))
            assert live <= -(-sink // 4) + -(-window // 4) + 1
        bm.check_invariants()
        for s, length in lens.items():
            assert len(bm.table(s)) == bm.blocks_for(length)
            assert released_ok(bm, bm.table(s), released_to[s])
    for sid in list(lens):
        bm.free(sid)
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=10),
       st.integers(7, 20), st.integers(4, 16), st.integers(1, 5), st.booleans())
def test_scheduler_with_a_window_never_loses_and_stays_bounded(reqs, num_blocks, budget,
                                                               max_seqs, swap):
    """The scheduler releases blocks behind each sequence's window as it computes (preemption by
    recompute or swap included): every request drains with its tokens, a running sequence never
    holds more blocks than its sinks, its window and its step's chunk need, nothing leaks."""
    bs, sink, window = 4, 4, 8
    bm = BlockManager(num_blocks, bs)
    bm.set_window(sink, window)
    space = SwapSpace(8, 1, bs) if swap else None
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, swap_space=space)
    requests = [host_request(str(i), [1] * p, SamplingParams(max_tokens=m, ignore_eos=True), i)
                for i, (p, m) in enumerate(reqs)]
    if max(-(-(window + budget) // bs) + 3 for _ in reqs) > num_blocks:
        return  # one sequence's window plus a chunk must fit
    for r in requests:
        sched.add(r)
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            live = sum(b != RELEASED for b in bm.table(s.seq_id))
            assert live <= 1 + -(-window // bs) + 1 + -(-n // bs), "window not released"
        if batch:
            sched.update_from_output(batch, sampled(batch, lambda s, i: 2))
        bm.check_invariants()
        if space is not None:
            space.check_invariants()
    assert not sched.has_unfinished(), "the workload did not drain"
    assert [r.seqs[0].output_token_ids for r in requests] == [[2] * m for _, m in reqs]
    assert bm.num_free == num_blocks

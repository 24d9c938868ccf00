"""Property tests: random add / step / abort / device-fault sequences (n > 1 and beam forks,
recompute and swap preemption, prefix caching and its host tier, faults in the step or in its
transfers) through the real LLMEngine on a fake device keep the block manager, the host tier and
the scheduler consistent, and lose or duplicate no request."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, note, settings, strategies as st

from pagedjax.core.beam_search import BeamSearchParams
from pagedjax.sampling_params import SamplingParams
from tests.reliability.fake_device import EOS, fake_engine

MAX_MODEL_LEN = 32

# lengths skewed long: hypothesis favours small numbers, and preemption needs full pools
PROMPT_LEN = st.integers(1, MAX_MODEL_LEN - 2) | st.integers(16, MAX_MODEL_LEN - 2)
MAX_TOKENS = st.integers(1, 24) | st.integers(12, 24)
ADD = st.tuples(st.just("add"), PROMPT_LEN, MAX_TOKENS, st.sampled_from([1, 1, 1, 2, 3]),
                st.sampled_from([0, 0, 1]), st.booleans(), st.integers(0, 2))
BEAM = st.tuples(st.just("beam"), st.integers(1, 20), st.integers(1, 3), st.integers(1, 8))
STEP = st.tuples(st.just("step"), st.integers(1, 12))
ABORT = st.tuples(st.just("abort"), st.integers(0, 1000))
FAIL = st.tuples(st.sampled_from(["fail", "fail", "fail_transfer"]))
# weighted by a percentile (one_of would weigh the kinds alike): faults are rare, as they kill
# every request of their step
OP = st.integers(0, 99).flatmap(lambda p: ADD if p < 40 else BEAM if p < 48 else STEP if p < 88
                                else ABORT if p < 96 else FAIL)
OPS = st.lists(OP, min_size=8, max_size=40)
CONFIG = st.fixed_dictionaries({
    "num_gpu_blocks_override": st.integers(4, 10),  # 4 blocks: one max_model_len sequence
    "max_num_seqs": st.sampled_from([1, 2, 3, 4, 4]),
    "max_num_batched_tokens": st.sampled_from([8, 16, 40]),
    "enable_prefix_caching": st.booleans(),
    "preemption_mode": st.sampled_from(["recompute", "swap", "swap"]),  # swap preempts less
    "kv_offloading_size": st.sampled_from([0.0, 1.0]),  # with prefix caching only
})


@dataclasses.dataclass
class Tracked:
    prompt_len: int
    max_tokens: int  # what the engine will generate at most
    n: int  # outputs expected (beam: at most this many)
    ignore_eos: bool
    beam: bool = False
    aborted: bool = False
    failed: bool = False
    finished: int = 0  # finished outputs seen


def check_invariants(engine, tracked: dict[str, Tracked]) -> None:
    bm, sched = engine.block_manager, engine.scheduler
    bm.check_invariants()  # ref counts == uses, each block free xor referenced
    assert min(bm.ref_counts) >= 0
    queued = [*sched.running, *sched.waiting, *sched.swapped]
    assert len({s.seq_id for s in queued}) == len(queued), "a sequence is queued twice"
    running = {s.seq_id for s in sched.running}
    held = {sid for sid, table in bm.tables.items() if table}
    assert held <= running, f"sequences {held - running} hold blocks but are not running"
    for s in sched.running:
        assert not s.finished and s.request_id in engine.requests
        table = bm.table(s.seq_id)
        assert len(table) == bm.blocks_for(s.num_computed_tokens), "block table vs computed"
        assert len(set(table)) == len(table), "a block twice in one table"
    for s in sched.waiting:
        assert not s.finished and s.request_id in engine.requests
        assert s.num_computed_tokens == 0 and not bm.table(s.seq_id)
    if engine.swap_space is not None:  # the swap space and the host tier's cache
        engine.swap_space.check_invariants()
    if sched.swap is not None:
        assert set(sched.swap.num_blocks) == {s.seq_id for s in sched.swapped}
        for s in sched.swapped:
            assert not s.finished and s.request_id in engine.requests
            assert sched.swap.num_blocks[s.seq_id] == bm.blocks_for(s.num_computed_tokens)
    queued_ids = {s.seq_id for s in queued}
    for rid, req in engine.requests.items():
        assert not tracked[rid].aborted and not tracked[rid].finished
        pending = {c.seq_id for c in req.unforked}
        for s in req.seqs:
            if not s.finished:  # queued once, or an n > 1 sample not forked yet
                assert (s.seq_id in queued_ids) != (s.seq_id in pending), f"seq {s.seq_id} lost"
    live = {s.seq_id for req in engine.requests.values() for s in req.seqs}
    assert queued_ids <= live, "a queued sequence belongs to no live request"


def record(outputs, tracked: dict[str, Tracked]) -> None:
    for out in outputs:
        t = tracked[out.request_id]
        assert not t.aborted, f"{out.request_id}: output after abort"
        assert t.finished == 0, f"{out.request_id}: output after its final output"
        if not out.finished:
            continue
        t.finished += 1
        if out.error is not None:
            t.failed = True
            assert "injected device fault" in out.error
            continue
        if t.beam:
            assert 1 <= len(out.outputs) <= t.n
            assert all(len(o.token_ids) <= t.max_tokens for o in out.outputs)
            continue
        assert len(out.outputs) == t.n
        for o in out.outputs:
            if t.ignore_eos or EOS not in o.token_ids:
                assert len(o.token_ids) == t.max_tokens and o.finish_reason == "length", o
            else:
                assert o.token_ids.index(EOS) == len(o.token_ids) - 1 and o.finish_reason == "stop"


def admitted(add) -> bool:
    """Run an add; False if the engine refused it because its samples could never all fit the
    pool at once (they would preempt one another forever)."""
    try:
        add()
    except ValueError as e:
        assert "KV blocks at once" in str(e), e
        return False
    return True


def run_ops(config: dict, ops: list, seed: int = 0):
    if not config.get("enable_prefix_caching"):
        config = {**config, "kv_offloading_size": 0.0}
    engine, device = fake_engine(seed, **config, num_cpu_blocks_override=6)
    tracked: dict[str, Tracked] = {}
    seats = config["max_num_seqs"]
    for i, op in enumerate(ops):
        rid = f"r{i}"
        if op[0] == "add":
            _, plen, max_tokens, n, extra, ignore_eos, prefix = op
            best_of = min(n + extra, seats)
            n = min(n, best_of)
            prompt = [10 + prefix] * (plen // 2) + [20 + i % 50] * (plen - plen // 2)
            if not admitted(lambda: engine.add_request(rid, prompt, SamplingParams(
                    n=n, best_of=best_of, max_tokens=max_tokens, ignore_eos=ignore_eos,
                    temperature=0.8, seed=i))):
                continue
            tracked[rid] = Tracked(plen, min(max_tokens, MAX_MODEL_LEN - plen), n, ignore_eos)
        elif op[0] == "beam":
            _, plen, width, max_tokens = op
            width = min(width, seats)
            if not admitted(lambda: engine.add_beam_request(
                    rid, [30 + i % 50] * plen, BeamSearchParams(beam_width=width,
                                                                max_tokens=max_tokens))):
                continue
            tracked[rid] = Tracked(plen, min(max_tokens, MAX_MODEL_LEN - plen), width, False,
                                   beam=True)
        elif op[0] == "step":
            for _ in range(op[1]):
                record(engine.step(), tracked)
                check_invariants(engine, tracked)
        elif op[0] == "abort" and engine.requests:
            victim = sorted(engine.requests)[op[1] % len(engine.requests)]
            engine.abort(victim)
            tracked[victim].aborted = True
        elif op[0] == "fail":
            device.fail = True
        elif op[0] == "fail_transfer" and engine.host_pool is not None:
            engine.host_pool.fail = True
        check_invariants(engine, tracked)
    for _ in range(3000):  # drain: everything left finishes
        if not engine.has_unfinished():
            break
        record(engine.step(), tracked)
        check_invariants(engine, tracked)
    assert not engine.has_unfinished(), "the workload did not drain in 3000 steps"
    bm = engine.block_manager
    assert bm.num_free == bm.num_blocks, f"{bm.num_blocks - bm.num_free} blocks leaked"
    assert not engine.requests and not bm.tables
    if engine.swap_space is not None:  # what the host tier holds is its cache's alone
        cached = engine.host_cache.num_pieces if engine.host_cache is not None else 0
        assert engine.swap_space.bm.num_free + cached == engine.swap_space.num_pieces
    for rid, t in tracked.items():  # nothing lost, nothing twice
        assert t.finished == (0 if t.aborted else 1), f"{rid}: {t}"
    return engine, device, tracked


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIG, OPS, st.integers(0, 2**16))
def test_random_workloads_keep_the_invariants(config, ops, seed):
    note(f"run_ops({config}, {ops}, {seed})")  # to replay a failure by hand
    engine, device, tracked = run_ops(config, ops, seed)
    sched = engine.scheduler
    event(f"{config['preemption_mode']} mode: preempted by swap {sched.num_preemptions_swap > 0}"
          f", by recompute {sched.num_preemptions_recompute > 0}")
    event(f"failed steps: {min(device.failures, 2)}, failed transfers: "
          f"{min(getattr(engine.host_pool, 'failures', 0), 2)}")
    if engine.host_cache is not None:
        event(f"host tier: stored {engine.host_pool.stored > 0}, loaded "
              f"{engine.host_pool.loaded > 0}")
    event(f"forks: n > 1 {any(t.n > 1 and not t.beam for t in tracked.values())}, beams "
          f"{any(t.beam for t in tracked.values())}")


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_the_property_workload_preempts_forks_and_fails(mode):
    """The property test is not vacuous: a fixed workload of the same kind preempts (in the mode
    asked), forks samples and beams, and survives a fault with requests in flight."""
    ops = [("add", 20, 12, 1, 0, True, 0), ("add", 10, 6, 2, 0, True, 1), ("beam", 6, 2, 6),
           ("add", 25, 7, 1, 0, True, 0), ("step", 6), ("fail",), ("add", 20, 12, 1, 1, True, 0),
           ("step", 3), ("abort", 1), ("step", 4)]
    engine, device, tracked = run_ops(
        {"num_gpu_blocks_override": 6, "max_num_seqs": 4, "max_num_batched_tokens": 16,
         "enable_prefix_caching": True, "preemption_mode": mode}, ops)
    sched = engine.scheduler
    assert device.failures == 1
    assert any(t.failed for t in tracked.values()) and any(
        t.finished and not t.failed for t in tracked.values())
    assert (sched.num_preemptions_swap if mode == "swap" else sched.num_preemptions_recompute)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_beam_sibling_is_admitted_ahead_of_what_its_blocks_hold_back(mode):
    """Found by the test above (CI, session 5): one beam of a width-2 search holds its blocks
    while it waits for its sibling's candidates; the sibling waits behind an older sequence
    (swapped) that needs those very blocks. Before the fix nothing ever ran again in swap mode;
    now the sibling is admitted first, and the workload drains. Recompute mode runs the same
    workload through the waiting queue alone."""
    config = {"num_gpu_blocks_override": 6, "max_num_seqs": 3, "max_num_batched_tokens": 8,
              "enable_prefix_caching": False, "preemption_mode": mode}
    ops = [("beam", 1, 1, 1), ("step", 1), ("add", 1, 1, 1, 0, False, 0), ("step", 1),
           ("step", 1), ("add", 16, 10, 1, 0, False, 0), ("beam", 12, 2, 7),
           ("add", 16, 10, 1, 0, False, 0)]
    engine, _, tracked = run_ops(config, ops, 0)
    assert engine.scheduler.num_preemptions > 0 and any(t.beam for t in tracked.values())


def test_the_host_tier_workload_stores_loads_and_survives_a_failed_transfer():
    """The property test's host-tier runs are not vacuous: a fixed workload whose shared prefix
    is evicted from a 6-block pool stores it, loads it back for a later prompt, and survives a
    fault injected in a step's transfers (its requests fail, the rest finish, nothing leaks)."""
    ops = [("add", 20, 4, 1, 0, True, 0), ("step", 8), ("add", 24, 4, 1, 0, True, 1),
           ("add", 24, 4, 1, 0, True, 2), ("step", 12), ("add", 20, 4, 1, 0, True, 0),
           ("step", 4), ("fail_transfer",), ("add", 24, 4, 1, 0, True, 1), ("step", 12),
           ("add", 24, 4, 1, 0, True, 2), ("add", 20, 4, 1, 0, True, 0)]
    engine, _, tracked = run_ops(
        {"num_gpu_blocks_override": 6, "max_num_seqs": 4, "max_num_batched_tokens": 16,
         "enable_prefix_caching": True, "preemption_mode": "recompute",
         "kv_offloading_size": 1.0}, ops)
    pool, host = engine.host_pool, engine.host_cache
    assert pool.stored > 0 and pool.loaded > 0 and host.hits > 0
    assert pool.failures == 1 and any(t.failed for t in tracked.values())

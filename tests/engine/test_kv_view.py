"""The KV view (pagedjax.kv_view, behind GET /v1/kv and pagedjax top) agrees with the block
manager, the scheduler and the swap space after every step of random workloads (n > 1 forks,
beams, prefix caching, recompute and swap preemption), on the fake device."""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, note, settings, strategies as st

from pagedjax.core.beam_search import BeamSearchParams
from pagedjax.core.sequence import Status
from pagedjax.kv_view import kv_view
from pagedjax.sampling_params import SamplingParams
from pagedjax.worker.swap import SwapStats
from tests.reliability.fake_device import fake_engine

ADD = st.tuples(st.just("add"), st.integers(1, 28), st.integers(1, 20), st.sampled_from([1, 2, 3]),
                st.integers(0, 2))
BEAM = st.tuples(st.just("beam"), st.integers(1, 16), st.integers(1, 3), st.integers(1, 8))
STEP = st.tuples(st.just("step"), st.integers(1, 8))
OPS = st.lists(st.one_of(ADD, ADD, BEAM, STEP, STEP), min_size=4, max_size=24)
CONFIG = st.fixed_dictionaries({
    "num_gpu_blocks_override": st.integers(4, 10),
    "max_num_seqs": st.sampled_from([2, 3, 4]),
    "enable_prefix_caching": st.booleans(),
    "preemption_mode": st.sampled_from(["recompute", "swap"]),
})


def expected_row(engine, req) -> dict:
    """A request's row computed the slow, obvious way."""
    bm, swap = engine.block_manager, engine.swap_space
    live = [s for s in req.seqs if not s.finished]
    held = {b for s in live for b in bm.table(s.seq_id)}
    statuses = {s.status for s in live}
    state = ("running" if Status.RUNNING in statuses else "swapped" if Status.SWAPPED in statuses
             else "preempted" if req.num_preemptions else "waiting")
    return {"state": state, "blocks_held": len(held),
            "blocks_shared": len([b for b in held if bm.ref_counts[b] > 1]),
            "blocks_on_host": sum(swap.num_blocks.get(s.seq_id, 0) for s in live) if swap else 0,
            "prompt_tokens": len(req.prompt_token_ids), "sequences": len(live)}


def check_view(engine) -> dict:
    bm = engine.block_manager
    view = kv_view(engine, engine.make_stats())
    pool = view["pool"]
    cached = set(getattr(bm, "block_key", {}))
    want = ["s" if rc > 1 else "h" if rc == 1 else "c" if b in cached else "."
            for b, rc in enumerate(bm.ref_counts)]
    assert pool["block_map"] == "".join(want)
    counts = Counter(want)
    assert (pool["held"], pool["shared"], pool["cached"]) == (counts["h"], counts["s"],
                                                              counts["c"])
    assert pool["used"] == bm.num_blocks - bm.num_free and pool["free"] == bm.num_free
    assert pool["num_blocks"] == len(pool["block_map"]) == bm.num_blocks
    assert [r["id"] for r in view["requests"]] == list(engine.requests)
    for row, req in zip(view["requests"], engine.requests.values()):
        assert {k: row[k] for k in expected_row(engine, req)} == expected_row(engine, req)
    assert sum(r["preemptions"] for r in view["requests"]) <= view["preemptions"]["total"]
    if engine.swap_space is not None:
        host = view["host"]
        swapped = sum(engine.swap_space.num_blocks.values())
        assert host["used"] == host["block_map"].count("w") == swapped
        assert sum(r["blocks_on_host"] for r in view["requests"]) == swapped
    else:
        assert view["host"] is None
    return view


def run(config: dict, ops: list, seed: int = 0) -> list[dict]:
    engine, _ = fake_engine(seed, **config, num_cpu_blocks_override=8)
    if engine.host_pool is not None:  # the fake host pool moves nothing: count what it would
        landed = engine.host_pool.landed = SwapStats()

        def execute(batch, runner, after=None):
            landed.blocks["out"] += len(batch.swap_out)
            landed.blocks["in"] += len(batch.swap_in)
            return 0.0

        engine.host_pool.execute = execute
    views = [check_view(engine)]
    for i, op in enumerate(ops):
        try:
            if op[0] == "add":
                _, plen, max_tokens, n, prefix = op
                prompt = [10 + prefix] * (plen // 2) + [20 + i] * (plen - plen // 2)
                engine.add_request(f"r{i}", prompt, SamplingParams(
                    n=min(n, config["max_num_seqs"]), max_tokens=max_tokens, ignore_eos=True,
                    temperature=0.8, seed=i))
            elif op[0] == "beam":
                _, plen, width, max_tokens = op
                engine.add_beam_request(f"r{i}", [30 + i] * plen, BeamSearchParams(
                    beam_width=min(width, config["max_num_seqs"]), max_tokens=max_tokens))
        except ValueError as e:  # samples that could never all fit the pool at once
            assert "KV blocks at once" in str(e), e
        if op[0] == "step":
            for _ in range(op[1]):
                engine.step()
                views.append(check_view(engine))
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        engine.step()
        views.append(check_view(engine))
    return views


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIG, OPS, st.integers(0, 2**16))
def test_the_view_matches_the_engine_after_every_step(config, ops, seed):
    note(f"run({config}, {ops}, {seed})")
    run(config, ops, seed)


def test_the_view_shows_sharing_preemption_swap_and_the_prefix_cache():
    """A fixed workload of the property's kind shows each thing pagedjax top is for."""
    ops = [("add", 20, 12, 2, 0), ("add", 17, 10, 1, 0), ("add", 26, 6, 1, 0), ("step", 8),
           ("add", 20, 8, 1, 0), ("beam", 6, 2, 6), ("step", 8)]
    views = run({"num_gpu_blocks_override": 8, "max_num_seqs": 4, "enable_prefix_caching": True,
                 "preemption_mode": "swap"}, ops)
    rows = [r for v in views for r in v["requests"]]
    assert any(v["pool"]["shared"] for v in views)
    assert any(v["pool"]["cached"] for v in views)
    assert any(r["state"] == "swapped" and r["blocks_on_host"] for r in rows)
    assert any(r["preemptions"] for r in rows)
    assert any(r["beam_width"] == 2 for r in rows) and any(r["n"] == 2 for r in rows)
    assert views[-1]["prefix_cache"]["hits"] > 0 and views[-1]["swap"]["out_blocks"] > 0

"""Prefix caching: same outputs as without it, only the uncached tail is computed, eviction
never takes a block in use, nothing leaks."""
import numpy as np
from hypothesis import given, settings, strategies as st

from pagedjax import LLM, SamplingParams
from pagedjax.core.prefix_cache import PrefixCachingBlockManager
from tests.conftest import assert_no_leak

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def multi_turn(llm, turns=4, chats=3, seed=0):
    """Each chat resends its whole history plus a new user turn; returns every turn's tokens."""
    rng = np.random.default_rng(seed)
    histories = [rng.integers(2, 128, size=40).tolist() for _ in range(chats)]
    system = rng.integers(2, 128, size=33).tolist()  # a shared system prompt
    outs = []
    for _ in range(turns):
        prompts = [system + h for h in histories]
        res = llm.generate(prompts, GREEDY, use_tqdm=False)
        for h, r in zip(histories, res):
            h += r.outputs[0].token_ids + rng.integers(2, 128, size=9).tolist()
        outs.append([r.outputs[0].token_ids for r in res])
    return outs


def test_multi_turn_identical_with_and_without_caching_under_preemption(tiny_qwen):
    kw = dict(num_gpu_blocks_override=16, max_model_len=256, max_num_batched_tokens=64)
    plain = LLM(loaded=tiny_qwen, **kw)
    cached = LLM(loaded=tiny_qwen, enable_prefix_caching=True, **kw)
    assert multi_turn(cached, turns=3, chats=5) == multi_turn(plain, turns=3, chats=5)
    assert cached.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    bm = cached.engine.block_manager
    assert bm.hits > 0 and bm.hits <= bm.queries
    assert cached.engine.stats.computed_tokens < plain.engine.stats.computed_tokens
    assert_no_leak(cached)


def test_second_identical_request_computes_only_its_tail(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, enable_prefix_caching=True, num_gpu_blocks_override=64,
              max_model_len=512)
    prompt = np.random.default_rng(3).integers(2, 128, size=100).tolist()  # 6 full blocks + 4
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    before = llm.engine.stats.computed_tokens
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    computed = llm.engine.stats.computed_tokens - before
    assert second == first
    # 96 of 100 prompt tokens come from the cache: 4 prompt tokens + 5 decodes are computed
    assert computed == 4 + 5, computed
    assert_no_leak(llm)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(1, 30)),
                min_size=1, max_size=40))
def test_eviction_never_takes_a_block_in_use(ops):
    """Random admissions of prompts drawn from a few shared prefixes, appends and frees: every
    block a live sequence holds keeps its contents (its tokens match), and invariants hold."""
    bm = PrefixCachingBlockManager(num_blocks=10, block_size=4, salt=1)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12]
    content: dict[int, tuple] = {}  # block -> tokens written there (what the device holds)
    live: dict[int, list[int]] = {}
    next_id = 0
    for op, which, n in ops:
        if op == 0:  # admit a prompt sharing a prefix
            toks = prefixes[which % 3] + [which] * (n % 7)
            got = bm.match_prefix(next_id, toks)
            for i, b in enumerate(bm.table(next_id)):  # a hit must hold the right tokens
                assert content[b] == tuple(toks[i * 4:(i + 1) * 4])
            if bm.can_append(next_id, got, len(toks) - got):
                bm.append_slots(next_id, got, len(toks) - got)
                for i, b in enumerate(bm.table(next_id)):
                    content[b] = tuple(toks[i * 4:(i + 1) * 4])
                bm.commit_full_blocks(next_id, lambda a, z, t=toks: t[a:z], len(toks))
                live[next_id] = toks
            else:
                bm.free(next_id)
            next_id += 1
        elif op == 1 and live:
            sid = sorted(live)[which % len(live)]
            bm.free(sid)
            del live[sid]
        bm.check_invariants()
        for sid, toks in live.items():
            for i, b in enumerate(bm.table(sid)):
                assert content[b] == tuple(toks[i * 4:(i + 1) * 4]), "a live block was reused"
    for sid in list(live):
        bm.free(sid)
    assert bm.num_free == bm.num_blocks

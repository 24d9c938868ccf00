"""Async scheduling (the next step dispatched before the last one's tokens reach the host) changes
nothing a user sees: the same tokens, logprobs and finish reasons as one step at a time, under
EOS and stop tokens, max_tokens, preemption, prefix caching, n > 1, beams and aborts."""
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.core.beam_search import BeamSearchParams
from tests.conftest import assert_no_leak


def workload(vocab: int, seed: int = 0):
    r = np.random.default_rng(seed)
    shared = r.integers(2, vocab, size=40).tolist()  # a prefix several prompts share
    prompts, params = [], []
    for i in range(20):
        tail = r.integers(2, vocab, size=int(r.integers(1, 90))).tolist()
        prompts.append(shared + tail if i % 3 == 0 else tail)
        params.append(SamplingParams(
            max_tokens=int(r.integers(1, 24)), temperature=float(r.choice([0.0, 0.9])),
            top_p=float(r.choice([1.0, 0.8])), seed=i, n=int(r.choice([1, 1, 2])),
            ignore_eos=bool(i % 2),  # the others may stop at EOS (id 1) early
            stop_token_ids=list(range(2 + i % 7, vocab, 9)) if i % 5 == 0 else None,
            logprobs=2 if i % 4 == 0 else None))
    return prompts, params


def run(model, async_scheduling: bool, **overrides):
    kw = dict(num_gpu_blocks_override=24, block_size=16, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=6, enable_prefix_caching=True)
    llm = LLM(loaded=model, async_scheduling=async_scheduling, **{**kw, **overrides})
    prompts, params = workload(model.cfg.vocab_size)
    outs = llm.generate(prompts, params, use_tqdm=False)
    beams = llm.beam_search([prompts[1], prompts[2]],
                            BeamSearchParams(beam_width=2, max_tokens=6))
    assert_no_leak(llm)
    return llm, [[(c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob, c.logprobs)
                  for c in o.outputs] for o in outs], \
        [[(b.tokens, b.cum_logprob) for b in o.sequences] for o in beams]


def assert_same(a, b):
    """Tokens and finishes exactly; logprobs to 1e-4: a different batch composition (sync and
    async schedule forks one step apart) changes float rounding in the batched matmuls."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-4)
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (a, b)
    elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], int):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("model_name", ["tiny_qwen", "tiny_llama"])
def test_async_equals_sync(model_name, request):
    model = request.getfixturevalue(model_name)
    sync_llm, sync_outs, sync_beams = run(model, False)
    async_llm, async_outs, async_beams = run(model, True)
    assert sync_llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert async_llm.engine.scheduler.num_preemptions > 0
    finish = {r for o in sync_outs for c in o for r in [c[1]]}
    assert finish == {"stop", "length"}, f"both ways of ending exercised, got {finish}"
    assert_same(async_outs, sync_outs)
    assert_same(async_beams, sync_beams)


def test_abort_while_a_step_is_on_the_device(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=32, max_model_len=128,
              max_num_seqs=4, async_scheduling=True)
    e = llm.engine
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for rid in "abc":
        e.add_request(rid, [3, 4, 5, 6], sp)
    for _ in range(4):
        e.step()
    assert e._on_device, "a step is in flight between two engine steps"
    e.abort("b")
    done = {}
    while e.has_unfinished():
        done.update((o.request_id, o) for o in e.step() if o.finished)
    assert sorted(done) == ["a", "c"]
    assert done["a"].outputs[0].token_ids == done["c"].outputs[0].token_ids
    assert len(done["a"].outputs[0].token_ids) == 30
    assert_no_leak(llm)

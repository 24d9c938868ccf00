"""The engine gives the same greedy tokens with the Pallas kernels (interpret mode here) as with
the pure-jnp reference attention, through prefill chunks, decode steps and preemption."""
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from tests.conftest import assert_no_leak


@pytest.mark.parametrize("backend", ["pallas-gpu", "pallas-tpu"])
def test_engine_pallas_backend_matches_reference(tiny_llama, backend):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, 128, size=int(n)).tolist() for n in (1, 17, 40, 70)]
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    kw = dict(num_gpu_blocks_override=9, max_model_len=128, max_num_batched_tokens=32,
              max_num_seqs=4)
    ref = LLM(loaded=tiny_llama, attention_backend="reference", **kw)
    pal = LLM(loaded=tiny_llama, attention_backend=backend, **kw)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in pal.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert pal.engine.scheduler.num_preemptions > 0  # 9 blocks cannot hold all four at once
    assert_no_leak(pal)

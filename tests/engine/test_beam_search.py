"""Beam search and n-way sampling: same results as transformers / as lone runs, shared memory."""
import numpy as np
import pytest

from pagedjax import LLM, BeamSearchParams, SamplingParams
from pagedjax.models import load_model
from tests.conftest import assert_no_leak
from tests.models.loader_testutil import make_torch_model

MAX_NEW = 10
EOS_CASES = {(2, 1.0, False), (4, 0.5, True)}  # cases where EOS-ended hypotheses are returned


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_and_ours(request, tmp_path_factory):
    """A random transformers model whose EOS is a token beams really meet (prompt 0's greedy
    3rd token), saved and loaded by pagedjax."""
    import torch

    model = make_torch_model(request.param, seed=7)
    prompt0 = torch.tensor([[5, 17, 33, 101]])
    greedy = model.generate(prompt0, max_new_tokens=3, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=0)
    eos = int(greedy[0, -1])
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    folder = tmp_path_factory.mktemp(f"beam-{request.param}")
    model.save_pretrained(folder)
    return model, load_model(str(folder), dtype="float32"), eos


def hf_beam(model, prompt, width, lp, early, eos):
    import torch

    out = model.generate(torch.tensor([prompt]), num_beams=width, do_sample=False,
                         max_new_tokens=MAX_NEW, length_penalty=lp, early_stopping=early,
                         eos_token_id=eos, pad_token_id=eos, output_scores=True,
                         return_dict_in_generate=True)
    gen = out.sequences[0, len(prompt):].tolist()
    if eos in gen:
        gen = gen[:gen.index(eos) + 1]  # HF pads a finished hypothesis with pad tokens
    return gen, float(out.sequences_scores[0])


@pytest.mark.parametrize("width, lp, early", [(2, 1.0, False), (4, 1.0, False),
                                              (4, 0.5, True), (2, 2.0, "never")])
def test_beam_search_matches_transformers(hf_and_ours, width, lp, early):
    model, loaded, eos = hf_and_ours
    llm = LLM(loaded=loaded, num_gpu_blocks_override=200, max_model_len=256)
    rng = np.random.default_rng(width)
    prompts = [[5, 17, 33, 101]] + [rng.integers(3, 256, size=int(n)).tolist() for n in (9, 30)]
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_NEW, length_penalty=lp,
                              early_stopping=early)
    ours = llm.beam_search(prompts, params)
    for p, out in zip(prompts, ours):
        tokens, score = hf_beam(model, p, width, lp, early, eos)
        best = out.sequences[0]
        assert best.tokens[len(p):] == tokens, f"prompt of {len(p)}"
        assert best.score == pytest.approx(score, abs=1e-4)
    # the EOS path is exercised: prompt 0 meets its EOS among the finalised hypotheses
    ended_by_eos = sum(s.finish_reason == "stop" for o in ours for s in o.sequences)
    if (width, lp, early) in EOS_CASES:  # these seeds do reach EOS: the EOS path is compared too
        assert ended_by_eos > 0
    assert_no_leak(llm)


def test_beam_search_memory_is_shared(tiny_qwen):
    """beam_width 4 over a 1,024-token prompt with 64 new tokens: the prompt's blocks are held
    once, plus at most a few blocks per beam; without sharing it would be ~4x the prompt."""
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=400, max_model_len=1200,
              max_num_batched_tokens=512)
    prompt = np.random.default_rng(0).integers(2, 128, size=1024).tolist()
    eng, peak = llm.engine, 0
    eng.add_beam_request("b", prompt, BeamSearchParams(beam_width=4, max_tokens=64, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.block_manager.num_blocks - eng.block_manager.num_free)
    prompt_blocks = 1024 // 16
    assert peak < prompt_blocks + 4 * (64 // 16 + 2), peak
    assert_no_leak(llm)


def test_beam_search_abort_frees_everything(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=100, max_model_len=512)
    eng = llm.engine
    eng.add_beam_request("b", list(range(2, 100)), BeamSearchParams(beam_width=3, max_tokens=40,
                                                                   ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert eng.block_manager.num_free < 100
    eng.abort("b")
    assert_no_leak(llm)


def test_n_samples_share_the_prompt_and_equal_lone_runs(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=200, max_model_len=512)
    prompt = np.random.default_rng(1).integers(2, 128, size=100).tolist()
    sp = SamplingParams(n=4, temperature=0.8, seed=11, max_tokens=12, ignore_eos=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert llm.engine.stats.computed_tokens < 100 + 4 * 12 + 4, "the prompt is prefilled once"
    again = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in again.outputs]
    for o in out.outputs:
        lone = SamplingParams(temperature=0.8, seed=11 + o.index, max_tokens=12, ignore_eos=True)
        assert llm.generate([prompt], lone, use_tqdm=False)[0].outputs[0].token_ids == o.token_ids
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_no_leak(llm)


def test_best_of_returns_the_n_most_likely(tiny_qwen):
    llm = LLM(loaded=tiny_qwen, num_gpu_blocks_override=200, max_model_len=512)
    sp = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    out = llm.generate([[4, 5, 6]], sp, use_tqdm=False)[0].outputs
    everyone = llm.generate([[4, 5, 6]], SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=8,
                                                        ignore_eos=True), use_tqdm=False)[0].outputs
    best = sorted(everyone, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in out] == [o.token_ids for o in best]
    assert_no_leak(llm)

"""Bad input is rejected with a message that says what to change, and nothing else is affected."""
import pytest

from pagedjax import LLM, EngineArgs, SamplingParams
from tests.conftest import assert_no_leak


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    return LLM(loaded=tiny_qwen, num_gpu_blocks_override=32, max_model_len=256)


def test_prompt_longer_than_max_model_len_rejected_before_taking_blocks(llm):
    with pytest.raises(ValueError, match=r"300 tokens.*max_model_len is 256"):
        llm.generate([list(range(1, 100)), [3] * 300], SamplingParams(max_tokens=2))
    assert_no_leak(llm)  # the good prompt of the same call was not queued either
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_bad_requests_leave_running_ones_alone(llm):
    eng = llm.engine
    eng.add_request("good", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()
    for bad in ([], [3] * 256, [999]):
        with pytest.raises(ValueError):
            eng.add_request("bad", bad, SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("good", [1], SamplingParams())
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"^{name} = 21 exceeds the maximum 20"):
            eng.add_request("bad", [1, 2], SamplingParams(**{name: 21}))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].request_id == "good" and len(outs[-1].outputs[0].token_ids) == 4
    assert_no_leak(llm)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(n=2, best_of=1), "best_of"),
    (dict(min_p=2.0), "min_p"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=1.5), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
])
def test_sampling_params_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_pool_too_small_for_one_sequence_fails_at_start(tiny_qwen):
    with pytest.raises(ValueError, match=r"max seq len \(1024\).*\(160\).*--max-model-len"):
        LLM(loaded=tiny_qwen, num_gpu_blocks_override=10, max_model_len=1024)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=7), "--block-size"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(preemption_mode="drop"), "--preemption-mode"),
])
def test_engine_args_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kwargs)


def test_unknown_engine_argument(tiny_qwen):
    with pytest.raises(TypeError, match="max_modle_len"):
        LLM(loaded=tiny_qwen, max_modle_len=5)


def test_max_model_len_above_model_maximum(tiny_qwen):
    with pytest.raises(ValueError, match="larger than the model's maximum"):
        LLM(loaded=tiny_qwen, max_model_len=10**6)

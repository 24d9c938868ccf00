"""The served path against a device of known speed: the modelled device's step time and queueing,
and the serve scenario with ``--fake-device`` end to end (a real server process whose device step
sleeps its modelled time): exact token counts, and a TPOT no shorter than the device's step."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from benchmarks.__main__ import main
from benchmarks.modelled_device import ModelledDevice, StepModel
from pagedjax.worker.runner import SampleMode, StepInputs, StepLayout


def _inputs(context_lens: list[int], new_tokens: list[int], S: int = 4) -> StepInputs:
    """A step's packed inputs with only what the modelled device reads filled in."""
    layout = StepLayout(T=16, S=S, W=1)
    packed = np.zeros(layout.size, np.int32)
    view = {k: packed[at:at + n] for k, (at, n, _) in layout.offsets.items()}
    view["context_lens"][:len(context_lens)] = context_lens
    starts = np.concatenate([[0], np.cumsum(new_tokens)])
    view["query_start_loc"][:len(starts)] = starts
    view["query_start_loc"][len(starts):] = starts[-1]
    return StepInputs(packed, layout, np.zeros((1, S), np.int32), SampleMode())


def test_step_model_is_the_roofline_of_its_flags():
    m = StepModel(weight_ms=4.5, token_us=23.4, row_us=61.0)
    assert m.seconds(64, 64) * 1e3 == pytest.approx(4.5 + 64 * 0.061)  # decode: weight-bound
    assert m.seconds(2048, 1) * 1e3 == pytest.approx(2048 * 0.0234 + 0.061)  # prefill: compute
    assert StepModel().seconds(64, 64) * 1e3 == pytest.approx(8.4, abs=0.05)  # the H100 figure
    with pytest.raises(ValueError, match="--fake-row-us -1"):
        StepModel(row_us=-1.0)
    with pytest.raises(ValueError, match="drop --model"):
        main(["serve", "--fake-device", "--model", "Llama-3.1-8B-Instruct"])
    with pytest.raises(ValueError, match="--fake-weight-ms -1"):
        main(["serve", "--fake-device", "--fake-weight-ms", "-1"])
    steps = [{"prefill": 100, "decode": 3, "first": 0}, {"prefill": 0, "decode": 0, "first": 0}]
    assert m.trace_seconds(steps) == pytest.approx(m.seconds(103, 4))


def test_steps_queue_on_the_device_and_never_sample_eos():
    model = StepModel(weight_ms=10.0, token_us=0.0, row_us=1000.0)  # 13 ms for 3 rows
    device = ModelledDevice(model, vocab_size=40, seed=0)
    t0 = time.perf_counter()
    first = device(_inputs([3, 4, 5], [1, 1, 3]))
    second = device(_inputs([4, 5, 6], [1, 1, 1]))
    assert time.perf_counter() - t0 < 0.013, "a dispatch does not wait for the device"
    out = second.to_host(with_top=False)
    assert time.perf_counter() - t0 >= 0.026, "the second step starts when the first ends"
    assert out.top_ids is None and first.to_host().top_ids.shape[0] == 4
    assert device.steps == 2 and device.busy_s == pytest.approx(0.026)
    tokens = np.concatenate([device(_inputs([1], [1])).tokens for _ in range(50)])
    assert tokens.min() >= 2 and tokens.max() < 40  # never 0 (bos) or 1 (the tiny model's eos)
    # a dispatch that costs the host: the call returns after it, and the step starts after it
    device = ModelledDevice(StepModel(weight_ms=5.0, dispatch_ms=8.0), vocab_size=40)
    t0 = time.perf_counter()
    result = device(_inputs([1], [1]))
    assert time.perf_counter() - t0 >= 0.008
    result.to_host()
    assert time.perf_counter() - t0 >= 0.008 + 0.005


def test_fake_device_server_is_no_faster_than_its_device(tmp_path):
    n, out_len, weight_ms = 3, 12, 15.0
    summary = main(["serve", "--fake-device", "--out", str(tmp_path), "--num-prompts", str(n),
                    "--input-len", "32", "--output-len", str(out_len), "--max-concurrency", "1",
                    "--num-warmup-prompts", "1", "--kv-cache-memory-bytes", "65536",
                    "--fake-weight-ms", str(weight_ms), "--server-timeout", "60"])
    record = json.loads((tmp_path / "serve.json").read_text())
    row = record["figures"]["rows"][0]
    assert record["figures"]["fake_device"] is True
    assert (row["completed"], row["failed"]) == (n, 0), row["errors"]
    assert row["server"]["generation_tokens"] == n * out_len  # the client's count is the server's
    assert row["steps"]["traced_generated_tokens"] == n * out_len
    step_ms = row["modelled"]["decode_step_ms"]
    assert step_ms == pytest.approx(weight_ms + 0.061)  # 32-token prefills are weight-bound too
    for r in record["figures"]["requests"][0]:
        assert r["ok"] and r["output_tokens"] == out_len
        # one request at a time, each token one modelled step after the last: no faster
        assert r["latency_ms"] >= out_len * step_ms
    # TPOT leaves out the first token, whose own delivery may be later than the others' by a
    # little: at most a step spread over the other tokens' gaps
    assert summary["median_tpot_ms"] >= step_ms * (1 - 1 / (out_len - 1))
    assert summary["tpot_over_modelled_decode"] == summary["median_tpot_ms"] / step_ms
    assert 0 < summary["modelled_device_busy_pct"] <= 101
    assert summary["host_work_pct"] + summary["device_wait_pct"] + summary["idle_pct"] == \
        pytest.approx(100.0)


def test_fake_serve_entry_refuses_what_it_cannot_model(capsys):
    from benchmarks import fake_serve

    for argv, needs in ((["--model", "Qwen2.5-7B-Instruct"], "--load-format dummy"),
                        (["--model", "Qwen2.5-7B-Instruct", "--load-format", "dummy"],
                         "--tokenizer DIR")):
        with pytest.raises(SystemExit):
            fake_serve.main(argv)
        assert needs in capsys.readouterr().err

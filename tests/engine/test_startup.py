"""Start-up: an engine that loads its own model times the device's bring-up apart from the load;
``ModelRunner.warmup`` compiles the sampler variants and the copy programs ahead of time on worker
threads while the step programs compile on the calling thread. Each program compiles exactly once
(the executable compiled ahead of time is the one its runs use), and afterwards a step in every
bucket, the sampler in every (S, mode) and every copy program compile nothing.

On the CPU the Pallas GPU kernels run interpreted with the coarse buckets a GPU gets; a one-layer
model keeps each compile to about a second."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading

import jax
import jax.monitoring
import numpy as np
import pytest

from benchmarks.harness import TINY_HF_CONFIG
from pagedjax import LLM
from pagedjax.core.batch import SAMPLING_FIELDS
from pagedjax.worker.runner import SAMPLE_MODES
from tests.conftest import TINY_QWEN, TinyModel, random_params

TINY1 = dataclasses.replace(TINY_QWEN, num_hidden_layers=1)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
PROGRAMS = ("jit(_step)", "jit(_sample_step)", "jit(_copy_step)")  # the runner's


@pytest.fixture(scope="module")
def tiny1():
    return TinyModel(TINY1, random_params(TINY1, seed=5))


@contextlib.contextmanager
def compiles(programs=PROGRAMS):
    """(program, thread name) of every XLA compilation inside the block of one of ``programs``
    (None: of any program)."""
    seen = []

    def listen(event, seconds, **kw):
        if event == BACKEND_COMPILE and (programs is None or kw.get("fun_name") in programs):
            seen.append((kw["fun_name"], threading.current_thread().name))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_an_engine_that_loads_its_model_times_device_init_apart(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    e = LLM(model=str(tmp_path), load_format="dummy", max_model_len=64,
            num_gpu_blocks_override=8).engine
    assert list(e.startup_s)[:3] == ["device init", "load", "prepare weights"]
    assert all(s >= 0 for s in e.startup_s.values())


@pytest.mark.parametrize("tp", [1, 2])
def test_concurrent_warmup_compiles_each_program_once_and_nothing_after(tiny1, tp):
    e = LLM(loaded=tiny1, attention_backend="pallas-gpu", precompile=False,
            tensor_parallel_size=tp, num_gpu_blocks_override=32, max_model_len=64,
            max_num_seqs=8, max_num_batched_tokens=16).engine
    r = e.runner
    assert r.num_compilations == 0
    with compiles() as compiled:
        parts = r.warmup(workers=3)
    buckets, sizes = r.buckets(), sorted({b.S for b in r.buckets()})
    warm = r.num_compilations
    assert warm == len(buckets) + len(sizes) * len(SAMPLE_MODES) + len(r.copy_buckets())
    assert len(compiled) == warm, "a program compiled twice"
    on = {program: {t for p, t in compiled if p == program} for program in PROGRAMS}
    assert on["jit(_step)"] == {"MainThread"}
    for small in PROGRAMS[1:]:
        assert "MainThread" not in on[small] and len(on[small]) > 0
    assert len(on["jit(_sample_step)"]) > 1, "the sampler variants compiled one at a time"
    assert set(parts) == {"steps", "sampler", "copies"} and all(v > 0 for v in parts.values())

    with compiles() as compiled:
        run_every_program(r, buckets)
    assert r.num_compilations == warm and not compiled, "a program compiled after warm-up"


def run_every_program(r, buckets):
    seen = set()
    for layout in buckets:  # every program again, with arguments made as ``execute`` makes them
        packed = np.zeros(layout.size, np.int32)
        for field in ("slot_mapping", "token_src"):
            at, n, _ = layout.offsets[field]
            packed[at:at + n] = -1
        logits, r.pool = r._step(r.params, r.pool, r._sampled, r._to_device(packed),
                                 layout=layout)
        if layout.S in seen:
            continue
        seen.add(layout.S)
        sampling = np.zeros((len(SAMPLING_FIELDS), layout.S), np.int32)
        for mode in SAMPLE_MODES:
            *_, r._sampled = r._sample(logits, r._to_device(sampling), mode=mode)
    for C in r.copy_buckets():
        r.pool = r._copy(r.pool, r._to_device(np.stack([np.zeros(C, np.int32),
                                                        np.full(C, -1, np.int32)])))
    jax.block_until_ready(r.pool)
    assert seen == {b.S for b in buckets}


def test_host_arrays_reach_the_device_without_a_program_of_their_own(tiny1):
    """The runner's host inputs go in by ``jax.device_put``: no staging program compiles for an
    input shape first seen after warm-up (``jnp.asarray`` compiled one per shape, outside the
    runner's count), here penalty marks and prompt-logprob targets."""
    from pagedjax import SamplingParams

    llm = LLM(loaded=tiny1, num_gpu_blocks_override=32, max_model_len=64, max_num_seqs=8,
              max_num_batched_tokens=16)
    with compiles(programs=None) as compiled:
        llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=3, presence_penalty=0.5,
                                                       prompt_logprobs=1))
    assert not [name for name, _ in compiled if name not in PROGRAMS], compiled

"""The real LLMEngine (scheduler, block manager, swap bookkeeping, beam and n>1 forks, fault
recovery) with its device step replaced by numpy: host logic at full speed, nothing compiled.

(A module, not conftest.py, so test files import it by name.)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple
from unittest import mock

import jax
import numpy as np

from pagedjax.config import EngineArgs
from pagedjax.engine import LLMEngine
from pagedjax.worker.sampler import MAX_LOGPROBS
from tests.conftest import TINY_QWEN

EOS = TINY_QWEN.eos_token_ids[0]


@dataclasses.dataclass
class NoWeights:
    cfg: object = TINY_QWEN
    params: dict = None
    tokenizer: object = None
    dtype: str = "float32"


class FakeResult(NamedTuple):
    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_logprobs: np.ndarray  # [S, MAX_LOGPROBS], best first
    top_ids: np.ndarray  # [S, MAX_LOGPROBS], distinct per row

    def to_host(self, with_top: bool = True) -> "FakeResult":
        return self


class FakeHostPool:
    """Swap and host-tier transfers that move nothing: the SwapSpace and HostPrefixCache
    bookkeeping stays the real one. ``fail`` makes the next call fail as a transfer on the
    device would: the pool is lost (the step's requests fail, the rest are recomputed)."""

    def __init__(self, spec, space, runner):
        self.fail = False
        self.failures = self.stored = self.loaded = 0

    def execute(self, batch, runner, after=None) -> float:
        self.stored += len(batch.offload_out)
        self.loaded += len(batch.offload_in)
        if self.fail:
            self.fail = False
            self.failures += 1
            for x in jax.tree.leaves(runner.pool):
                x.delete()
            raise RuntimeError("injected device fault in a transfer")
        return 0.0


class FakeDevice:
    """The device step's stand-in (``LLMEngine(execute=...)``): random distinct top ids per row, EOS now and then; ``fail``
    makes the next call lose the pool (as a failure after donation does) and raise."""

    def __init__(self, runner, seed: int, eos_rate: float = 0.05):
        self.runner = runner
        self.rng = np.random.default_rng(seed)
        self.eos_rate = eos_rate
        self.fail = False
        self.calls = self.failures = 0

    def __call__(self, inputs) -> FakeResult:
        layout = inputs.layout
        self.calls += 1
        if self.fail:
            self.fail = False
            self.failures += 1
            for x in jax.tree.leaves(self.runner.pool):
                x.delete()
            raise RuntimeError("injected device fault")
        S, V = layout.S, TINY_QWEN.vocab_size
        top_ids = np.argsort(self.rng.random((S, V)), axis=1)[:, :MAX_LOGPROBS].astype(np.int32)
        top_lp = -np.sort(self.rng.uniform(0.01, 6.0, (S, MAX_LOGPROBS)), axis=1)
        eos = self.rng.random(S) < self.eos_rate
        tokens = np.where(eos, EOS, top_ids[:, 0]).astype(np.int32)
        return FakeResult(tokens, top_lp[:, 0].astype(np.float32), top_lp.astype(np.float32),
                          top_ids)


def fake_engine(seed: int = 0, **engine_args) -> tuple[LLMEngine, FakeDevice]:
    args = EngineArgs(**{"max_model_len": 32, "block_size": 8, "max_num_seqs": 4,
                         "max_num_batched_tokens": 16, **engine_args})
    device = FakeDevice(None, seed)
    with mock.patch("pagedjax.worker.swap.HostKVPool", FakeHostPool):
        engine = LLMEngine(args, loaded=NoWeights(), execute=device)  # the fake-device seam
    device.runner = engine.runner  # whose pool a failing call loses
    return engine, device

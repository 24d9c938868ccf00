"""A device of known speed: the engine's fake-device seam (``LLMEngine(execute=...)``) with a step
that takes a modelled time, so the served path's host side (engine host work, HTTP/SSE,
detokenisation, the GIL shared by the engine thread and the event loop) can be measured on any
machine against a device whose step time is known (benchmarks/fake_serve.py serves with it).

The step time is a roofline of the H100 figures in benchmarks/NOTES.md (Qwen2.5-7B, bf16):

    t = max(W, C x tokens) + A x rows

- W (``--fake-weight-ms``, 4.5): reading the 15.2 GB of weights once at ~3.35 TB/s, the floor of
  every step;
- C (``--fake-token-us``, 23.4): 15.2 GFLOP a token at 650 TFLOP/s, the matmuls of a step with many
  tokens (a prefill chunk);
- A (``--fake-row-us``, 61): per sequence row, attention over a ~1k-token context and the sampler:
  what takes a 64-row decode step to the measured ~8.4 ms (4.5 + 64 x 0.061).

and, on the host, ``--fake-dispatch-ms`` (default 0): what launching a step costs the engine thread
(the jitted call), spent busy and holding the GIL, the worst case for the event loop beside it.

``tokens`` and ``rows`` are the step's real ones, not its padded bucket.

Steps queue on one device as they do on a GPU: ``execute`` returns once the step is dispatched,
not done; a step starts when it is dispatched or when the step before it ends, whichever is
later, and its result's ``to_host`` sleeps until it ends. ``time.sleep`` releases the GIL as a
device wait does, so the engine's overlap of host work with the device (async scheduling) is as
real as on the card.
Sampled tokens are random ids in [2, vocab): never an EOS id, for ``ignore_eos`` workloads.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from pagedjax.worker.runner import StepResult
from pagedjax.worker.sampler import MAX_LOGPROBS

FLAGS = (("weight_ms", "--fake-weight-ms", 4.5,
          "the floor of every modelled step: reading the weights once (default 4.5: Qwen2.5-7B "
          "bf16 at ~3.35 TB/s)"),
         ("token_us", "--fake-token-us", 15.2e9 / 650e12 * 1e6,
          "modelled matmul time per token (default 23.4: 15.2 GFLOP a token at 650 TFLOP/s)"),
         ("row_us", "--fake-row-us", 61.0,
          "modelled time per sequence row: attention and sampling (default 61: a 64-row decode "
          "step of ~8.4 ms on the H100)"),
         ("dispatch_ms", "--fake-dispatch-ms", 0.0,
          "host time each dispatch spends in the engine thread, holding the GIL, before its step "
          "starts (default 0; the H100's jitted step call measured 5.3 ms at batch 1 and 9-9.6 "
          "ms at 256 sequences: benchmarks/NOTES.md, step-profile)"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    for dest, flag, default, help_ in FLAGS:
        p.add_argument(flag, dest=f"fake_{dest}", type=float, default=default, help=help_)


@dataclasses.dataclass(frozen=True)
class StepModel:
    weight_ms: float = FLAGS[0][2]
    token_us: float = FLAGS[1][2]
    row_us: float = FLAGS[2][2]
    dispatch_ms: float = FLAGS[3][2]

    def __post_init__(self):
        for dest, flag, _, _ in FLAGS:
            if not getattr(self, dest) >= 0:
                raise ValueError(f"{flag} {getattr(self, dest)} must be >= 0")

    @classmethod
    def from_args(cls, args) -> "StepModel":
        return cls(*(getattr(args, f"fake_{dest}") for dest, _, _, _ in FLAGS))

    def flags(self) -> list[str]:
        """This model as the flags that give it (for a child process)."""
        return [x for dest, flag, _, _ in FLAGS for x in (flag, repr(getattr(self, dest)))]

    def seconds(self, tokens: int, rows: int) -> float:
        return (max(self.weight_ms, self.token_us * tokens / 1e3) + self.row_us * rows / 1e3) / 1e3

    def trace_seconds(self, steps: list[dict]) -> float:
        """The modelled device time of a server's traced steps (server/step_trace.py). The trace
        counts the prefill rows that sample, not every prefill row: a step with prefill tokens
        and none that samples is counted as one row (a prefill row costs ~1/400 of a chunk's
        matmuls here, so the approximation is well inside the model's own)."""
        total = 0.0
        for s in steps:
            if s["prefill"] or s["decode"]:
                rows = s["decode"] + max(s["first"], 1 if s["prefill"] else 0)
                total += self.seconds(s["prefill"] + s["decode"], rows)
        return total


class ModelledResult:
    """A dispatched step's results: ``to_host`` waits for the modelled end of the step."""

    def __init__(self, result: StepResult, done_at: float):
        self.result, self.done_at = result, done_at
        self.tokens = result.tokens

    def to_host(self, with_top: bool = True) -> StepResult:
        wait = self.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.result if with_top else self.result._replace(top_logprobs=None, top_ids=None)


class ModelledDevice:
    """``LLMEngine(execute=...)``: each call is one step dispatched to a device that runs
    ``model``'s time a step, one step after another."""

    def __init__(self, model: StepModel, vocab_size: int, seed: int = 0):
        if vocab_size <= 2:
            raise ValueError(f"the modelled device samples ids in [2, vocab): vocab {vocab_size}")
        self.model, self.vocab_size = model, vocab_size
        self.rng = np.random.default_rng(seed)
        self.free_at = time.perf_counter()  # when the last dispatched step ends
        self.steps, self.busy_s = 0, 0.0

    def __call__(self, inputs) -> ModelledResult:
        if inputs.prompt_targets is not None:
            raise ValueError("the modelled device computes no prompt logprobs: leave out "
                             "prompt_logprobs")
        if self.model.dispatch_ms:
            until = time.perf_counter() + self.model.dispatch_ms / 1e3
            while time.perf_counter() < until:
                pass
        layout = inputs.layout
        f = {k: inputs.packed[at:at + n] for k, (at, n, _) in layout.offsets.items()}
        tokens = int(f["query_start_loc"][-1])  # padding entries repeat the real total
        rows = int(np.count_nonzero(f["context_lens"]))
        t = self.model.seconds(tokens, rows)
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + t
        self.steps, self.busy_s = self.steps + 1, self.busy_s + t
        S = layout.S
        top_ids = np.tile(np.arange(2, 2 + MAX_LOGPROBS, dtype=np.int32), (S, 1))
        top_lp = np.tile(-np.arange(1, 1 + MAX_LOGPROBS, dtype=np.float32), (S, 1))
        sampled = self.rng.integers(2, self.vocab_size, size=S).astype(np.int32)
        return ModelledResult(StepResult(sampled, np.full(S, -1.0, np.float32), top_lp, top_ids),
                              self.free_at)

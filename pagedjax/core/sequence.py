"""A sequence's host-side state: its tokens, how many of them are in the KV cache, and why it ended."""
from __future__ import annotations

import dataclasses
import enum
import itertools

from pagedjax.sampling_params import SamplingParams

_seq_ids = itertools.count()
PLACEHOLDER = -1  # an output token still on the device (async scheduling)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: the preemption victim is the largest
    seed: int  # per-sequence sampling seed; the draw for token i depends on (seed, i) only
    index: int = 0  # position among the request's n samples
    seq_id: int = dataclasses.field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    output_top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    # params.prompt_logprobs: one list shared by the request's samples, entry i for prompt token
    # i (None until computed; entry 0 stays None); the runner asks for the missing ones
    prompt_logprobs: list[dict[int, float] | None] | None = None
    stop_check_from: int = 0  # min_tokens: stop strings are looked for after this much text
    # Async scheduling: the trailing ``num_pending`` output tokens are PLACEHOLDERs, sampled by
    # steps still on the device; ``pending_src`` = (step id, row) of the newest one there.
    num_pending: int = 0
    pending_src: tuple[int, int] | None = None
    last_token_pending: bool = False  # its final token is on the device: schedule it no more

    @property
    def num_known_tokens(self) -> int:
        return self.num_tokens - self.num_pending

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        if self.last_token_pending:
            return 0
        return self.num_tokens - self.num_computed_tokens

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def tokens(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

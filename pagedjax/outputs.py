"""What a request returns, in vLLM's shape: RequestOutput with one CompletionOutput per sample."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float] | None  # per token, the sampled token's logprob
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    score: float | None = None  # beam search: cumulative_logprob / generated_len ** length_penalty

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # the request failed (finish_reason "error"): why
    # SamplingParams.prompt_logprobs: per prompt token (the first None, nothing predicts it) the
    # token's own logprob and the top k, {token id: logprob}
    prompt_logprobs: list[dict[int, float] | None] | None = None

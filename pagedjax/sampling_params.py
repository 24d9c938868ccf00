"""SamplingParams: vLLM's request-level generation settings, validated on construction."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token: its logprob and the top k
    skip_special_tokens: bool = True
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    presence_penalty: float = 0.0  # subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}")
        need(isinstance(self.best_of, int) and self.best_of >= self.n,
             f"best_of must be an integer >= n ({self.n}), got {self.best_of}")
        need(0.0 <= self.temperature < math.inf,
             f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and (self.top_k in (-1, 0) or 1 <= self.top_k < 2**31),
             f"top_k must be -1 or 0 (disabled) or in [1, 2**31), got {self.top_k}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             f"logprobs must be an integer >= 0, got {self.logprobs}")
        need(self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
             f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs}")
        need(0.0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be a finite number > 0 (1 means none), got "
             f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        need(all(isinstance(s, str) and s for s in self.stop),
             f"stop must be non-empty strings, got {self.stop}")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty acts on this request's logits (pagedjax.worker.penalties)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

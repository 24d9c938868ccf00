"""Pieces both endpoints build responses from: OpenAI's error body, SSE framing, and the
incremental deltas of a stream."""
from __future__ import annotations

import dataclasses

from starlette.responses import Response

from pagedjax.outputs import CompletionOutput

from pagedjax.entrypoints.server import protocol as P


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> P.ErrorResponse:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type,
                                                 param=self.param, code=self.code or self.status))


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


@dataclasses.dataclass
class ChoiceState:
    """How much of one sample has been streamed."""

    text_sent: int = 0
    tokens_sent: int = 0
    offset: int = 0  # text_offset of the next logprobs token
    done: bool = False


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per token: the top k and the sampled token
    finish_reason: str | None
    stop_reason: int | str | None


def next_delta(state: ChoiceState, o: CompletionOutput, holdback: int) -> Delta | None:
    """The part of ``o`` not sent yet. While a sample runs, the last ``holdback`` characters are
    held back: a stop string completed by a later token truncates the text there, and text
    already sent cannot be taken back."""
    if state.done:
        return None
    finished = o.finish_reason is not None
    end = len(o.text) if finished else max(len(o.text) - holdback, state.text_sent)
    if end == state.text_sent and not finished:
        return None  # the new tokens are reported with the next text
    d = Delta(o.text[state.text_sent:end], o.token_ids[state.tokens_sent:],
               o.logprobs[state.tokens_sent:] if o.logprobs is not None else None,
               openai_finish(o.finish_reason), o.stop_reason)
    state.text_sent, state.tokens_sent, state.done = end, len(o.token_ids), finished
    return d


def openai_finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def best_first(top: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(top.items(), key=lambda kv: -kv[1])


def stop_reason(req: P._SamplingFields, o: CompletionOutput) -> int | str | None:
    return None if req.use_beam_search else o.stop_reason  # a beam has none (its score: o.score)


def usage_info(prompt_tokens: int, completion_tokens: int) -> P.UsageInfo:
    return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


def json_response(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")

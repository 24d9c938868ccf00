"""OpenAI request and response bodies (pydantic), with vLLM's extra sampling fields.

Request models ignore fields they do not know (as vLLM does), so clients that send newer OpenAI
fields keep working; fields we know but cannot honour yet are rejected by the handlers with a 400
that says so, never silently dropped. Fields are strict: ``"5"`` or ``true`` is not an integer and
``"0.5"`` is not a number (an integer is a number). No string anywhere in a request may hold a lone
UTF-16 surrogate, which JSON's ``\\ud800`` escapes can carry but no tokenizer or UTF-8 response can.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(extra="ignore", strict=True)
_SCALARS = frozenset({int, float, bool, type(None)})


def invalid_unicode_at(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path to the first string in ``value`` (a dict key or any value, at any depth) that is
    not valid Unicode, else None. A bad key is reported as its dict's path plus "<key>", so the
    path itself is always printable."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and not _encodable(k):
                return path + ("<key>",)
            found = invalid_unicode_at(v, path + (str(k),))
            if found is not None:
                return found
    elif isinstance(value, list) and not set(map(type, value)) <= _SCALARS:  # token ids: skip
        for i, v in enumerate(value):
            found = invalid_unicode_at(v, path + (str(i),))
            if found is not None:
                return found
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints. None means "the OpenAI default"."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data: Any) -> Any:
        where = invalid_unicode_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", "not valid Unicode text (it holds a lone UTF-16 surrogate, "
                "such as \\ud800): send UTF-8 text", {"field": ".".join(where) or "body"})
        return data

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # known and refused by name unless unused (OpenAIServing._check_unsupported)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    repetition_penalty: float | None = None
    min_tokens: int = 0
    use_beam_search: bool = False  # width: best_of if given, else n; returns the n best
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False  # with max_tokens 0: the prompt (and its logprobs) and nothing else
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM's extra; echo + logprobs k imply k


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


# ---- responses ---------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None  # 1 for the most likely; None: the prompt token outside the top k
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extra: per prompt token (the first None), {token id: its logprob} for the prompt
    # token and the top prompt_logprobs
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedjax"
    root: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

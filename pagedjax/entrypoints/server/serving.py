"""The two generation endpoints: an OpenAI request in, engine requests out, an OpenAI response (or
an SSE stream of chunks) back. Everything a client can get wrong is checked here, before the
engine sees the request, and answered with an ``APIError`` the app turns into OpenAI's error body.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pagedjax.core.beam_search import BeamSearchParams
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import SamplingParams

from pagedjax.entrypoints.server import protocol as P
from pagedjax.entrypoints.server.chat_prompt import ChatPromptError, chat_prompt_ids, text_messages
from pagedjax.entrypoints.server.engine_loop import (AsyncEngine, EngineDeadError,
                                                     RequestFailedError, RequestStream, Submission)
from pagedjax.entrypoints.server.responses import (APIError, ChoiceState, best_first,
                                                   json_response, next_delta, openai_finish, sse,
                                                   stop_reason, usage_info)
from pagedjax.entrypoints.server.tokenizer_thread import TokenizerThread

CHAT_ROLES = ("system", "user", "assistant", "tool")


class OpenAIServing:
    def __init__(self, aengine: AsyncEngine, served_model_name: str, *,
                 max_waiting_requests: int = 1024, max_logprobs: int = 20,
                 max_n: int | None = None, max_tokenizer_queue: int | None = None,
                 parse_special_tokens_in_chat: bool = False):
        self.aengine = aengine
        self.engine = aengine.engine  # read-only use: config and the pure validate_prompt
        self.model_name = served_model_name
        self.max_model_len = self.engine.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.max_logprobs = max_logprobs
        self.max_n = max_n or self.engine.args.max_num_seqs
        # every tokenizer call of the handlers runs on this thread, off the event loop; by default
        # as many prompts may wait for it as for the scheduler
        self.tokens = TokenizerThread(self.engine.tokenizer,
                                      max_tokenizer_queue or max_waiting_requests)
        self.tokenizer = self.tokens.tokenizer
        self.parse_special_tokens_in_chat = parse_special_tokens_in_chat

    # ---- checks shared by both endpoints -----------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")

    def _check_unsupported(self, req: P._SamplingFields, logprobs: bool) -> None:
        """A field this server cannot honour is refused by name, never silently ignored."""
        if req.use_beam_search:
            for name, used in (("stop", req.stop), ("stop_token_ids", req.stop_token_ids),
                               ("logprobs", logprobs),
                               ("prompt_logprobs", getattr(req, "prompt_logprobs", None)),
                               ("repetition_penalty", req.repetition_penalty not in (None, 1.0)),
                               ("presence_penalty", req.presence_penalty),
                               ("frequency_penalty", req.frequency_penalty),
                               ("min_tokens", req.min_tokens)):
                if used:
                    raise APIError(400, f"{name} is not supported with use_beam_search",
                                   param=name)
        for name, used in (
                ("response_format", req.response_format not in (None, {"type": "text"})),
                ("tools", req.tools), ("tool_choice", req.tool_choice not in (None, "none")),
                ("functions", req.functions),
                ("function_call", req.function_call not in (None, "none")),
                ("parallel_tool_calls", req.parallel_tool_calls is not None),
                ("logit_bias", req.logit_bias), ("suffix", getattr(req, "suffix", None))):
            if used:
                raise APIError(400, f"{name} is not supported by this server: leave it out",
                               param=name)
        for m in getattr(req, "messages", ()):
            if m.role not in CHAT_ROLES:
                raise APIError(400, f"message role {m.role!r} is not supported: use one of "
                                    f"{', '.join(CHAT_ROLES)}", param="messages")

    def _params(self, req: P._SamplingFields, *, max_tokens: int | None, best_of: int | None,
                logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and k > self.max_logprobs:
                raise APIError(400, f"{name} {k} is over the maximum ({self.max_logprobs})",
                               param=name)
        try:
            params = SamplingParams(
                n=req.n, best_of=best_of,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                seed=req.seed, max_tokens=max_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
                repetition_penalty=(1.0 if req.repetition_penalty is None
                                    else req.repetition_penalty),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, min_tokens=req.min_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
        if params.best_of > self.max_n:  # before anything is sized by it
            name = "n" if params.n > self.max_n else "best_of"
            raise APIError(400, f"{name} = {getattr(params, name)} is over the maximum "
                                f"({self.max_n}, --max-n)", param=name)
        return params

    def _engine_params(self, req: P._SamplingFields, params: SamplingParams, ids: list[int]):
        """What the engine runs for one prompt: ``params``, or a beam search of width
        ``params.best_of`` whose ``params.n`` best hypotheses are returned."""
        if not req.use_beam_search:
            return params
        try:
            return BeamSearchParams(
                beam_width=params.best_of, ignore_eos=req.ignore_eos,
                max_tokens=params.max_tokens or self.max_model_len - len(ids),
                temperature=req.temperature or 0.0, length_penalty=req.length_penalty,
                early_stopping=req.early_stopping)
        except ValueError as e:
            raise APIError(400, f"use_beam_search: {e}", param="use_beam_search") from None

    def _check_length(self, ids: list[int], max_tokens: int | None,
                      max_tokens_field: str = "max_tokens") -> None:
        try:
            self.engine.validate_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. "
                     f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                     f"prompt, {max_tokens} in the completion). Please reduce the prompt or "
                     f"{max_tokens_field}.", param=max_tokens_field)

    def _check_load(self) -> None:
        if self.aengine.draining:
            raise APIError(503, "the server is shutting down; retry on another replica",
                           type="server_error", code="shutting_down")
        if not self.aengine.is_alive:
            raise APIError(503, "the engine is not running", type="server_error",
                           code="engine_dead")
        queued = self.aengine.num_queued
        if queued >= self.max_waiting_requests:
            raise APIError(503, f"the server is overloaded: {queued} sequences are waiting "
                                f"(--max-waiting-requests {self.max_waiting_requests}); "
                                "retry later",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"})

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (dummy weights?): send token ids",
                           param="prompt")
        return list(self.tokenizer.encode(text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def _submit(self, subs: list[Submission]) -> RequestStream:
        self._check_load()
        try:
            return await self.aengine.submit(subs, time.time())
        except ValueError as e:  # what only the engine checks (n vs --max-num-seqs, ...)
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:
            raise APIError(503, str(e), type="server_error", code="engine_dead") from None
        except RequestFailedError as e:  # refused at the end of a drain
            raise APIError(e.status, str(e), type="server_error", code=e.code) from None

    async def _collect(self, stream: RequestStream,
                       raw: Request) -> dict[str, RequestOutput] | None:
        """Wait for every request of ``stream`` to finish; None (and the requests aborted) when
        the client goes away first."""
        final: dict[str, RequestOutput] = {}

        async def consume():
            async for batch in stream.updates():
                final.update((o.request_id, o) for o in batch)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                return None
            try:
                consumer.result()
            except RequestFailedError as e:  # its step failed, the engine died, or a drain ended
                raise APIError(e.status, str(e), type="server_error", code=e.code) from None
            return final
        finally:
            consumer.cancel()
            watcher.cancel()
            self.aengine.abort(stream.request_ids)  # no-op for finished requests

    def _streaming(self, body: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
        # The background task runs after the stream ends, a disconnect included, even when the
        # generator is left suspended mid-yield; the abort is a no-op for finished requests.
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(self.aengine.abort, stream.request_ids))

    # ---- /v1/completions ---------------------------------------------------------------------
    async def _completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) of each prompt. Text is tokenised with special-token text parsed,
        as vLLM does: a raw prompt is the client's own template (chat content is not: see
        chat_prompt.py)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty: give a string, a list of strings, token ids "
                                "or a list of token-id lists", param="prompt")
        if isinstance(prompt[0], str):
            ids = await self.tokens.admit(lambda: [self._encode(p) for p in prompt])
            return list(zip(prompt, ids))
        if isinstance(prompt[0], int):
            return [(None, list(prompt))]
        return [(None, list(p)) for p in prompt]

    async def create_completion(self, req: P.CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        self._check_unsupported(req, req.logprobs is not None)
        if req.stream and not req.use_beam_search and req.best_of not in (None, req.n):
            raise APIError(400, "best_of must equal n when streaming", param="best_of")
        # echo + logprobs k scores the prompt (vLLM: prompt_logprobs k); with max_tokens 0, as
        # lm-evaluation-harness sends it, one token is generated and dropped
        echo_scores = req.echo and req.logprobs is not None
        echo_only = req.echo and req.max_tokens == 0
        prompt_lp = req.prompt_logprobs
        if prompt_lp is None and echo_scores:
            prompt_lp = req.logprobs
        if req.stream and (prompt_lp is not None or echo_only):
            name = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
            raise APIError(400, f"{name} with logprobs or max_tokens 0 is not supported when "
                                "streaming: set stream to false", param=name)
        params = self._params(req, max_tokens=1 if echo_only else req.max_tokens,
                              best_of=req.best_of, logprobs=req.logprobs,
                              prompt_logprobs=prompt_lp)
        prompts = await self._completion_prompts(req.prompt)
        if len(prompts) * params.best_of > self.max_waiting_requests:
            raise APIError(400, f"{len(prompts)} prompts x best_of {params.best_of} sequences "
                                f"are more than the server queues ({self.max_waiting_requests}, "
                                "--max-waiting-requests): split the request", param="prompt")
        for _, ids in prompts:
            self._check_length(ids, req.max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        subs = [Submission(f"{rid}-{i}", ids, self._engine_params(req, params, ids))
                for i, (_, ids) in enumerate(prompts)]
        stream = await self._submit(subs)
        echoes = [""] * len(prompts)
        if req.echo:
            echoes = await self.tokens.run(
                lambda: [t if t is not None else self._decode(ids) for t, ids in prompts])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._streaming(self._completion_chunks(rid, stream, params, echoes, prompts,
                                                           include_usage, req.use_beam_search),
                                   stream)
        final = await self._collect(stream, raw)
        if final is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        choices, completion_tokens = [], 0
        for i, sub in enumerate(subs):
            out = final[sub.request_id]
            for j, o in enumerate(out.outputs[:params.n]):
                ids, tops, text = ([], [], "") if echo_only else (o.token_ids, o.logprobs, o.text)
                if echo_scores:  # the prompt's tokens first, the first without a logprob
                    ids, tops = out.prompt_token_ids + ids, out.prompt_logprobs + (tops or [])
                completion_tokens += len(o.token_ids) if not echo_only else 0
                lp = (await self.tokens.run(self._completion_logprobs, ids, tops, 0)
                      if req.logprobs is not None else None)
                choices.append(P.CompletionChoice(
                    index=i * params.n + j, text=echoes[i] + text, logprobs=lp,
                    finish_reason="length" if echo_only else openai_finish(o.finish_reason),
                    stop_reason=None if echo_only else stop_reason(req, o),
                    prompt_logprobs=(await self.tokens.run(self._prompt_logprobs,
                                                           out.prompt_logprobs, prompt_lp)
                                     if req.prompt_logprobs is not None else None)))
        usage = usage_info(sum(len(ids) for _, ids in prompts), completion_tokens)
        return json_response(P.CompletionResponse(id=rid, model=self.model_name,
                                                  choices=choices, usage=usage))

    def _completion_logprobs(self, token_ids: list[int],
                             tops: list[dict[int, float] | None] | None,
                             offset: int) -> P.CompletionLogprobs:
        """OpenAI's shape; a token without logprobs (the first of an echoed prompt) gets null."""
        out = P.CompletionLogprobs()
        for t, top in zip(token_ids, tops or []):
            tok = self._decode([t])
            out.tokens.append(tok)
            out.token_logprobs.append(None if top is None else top.get(t))
            out.top_logprobs.append(None if top is None else
                                    {self._decode([i]): lp for i, lp in best_first(top)})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def _prompt_logprobs(self, entries: list[dict[int, float] | None], k: int):
        """vLLM's ``prompt_logprobs``: per prompt token {token id: logprob, rank, decoded}; the
        prompt token is there even outside the top k, and its rank then is unknown (None)."""
        def one(top):
            return {t: P.PromptLogprob(logprob=lp, rank=r if r <= k else None,
                                       decoded_token=self._decode([t]))
                    for r, (t, lp) in enumerate(best_first(top), start=1)}

        return [None if top is None else one(top) for top in entries]

    async def _completion_chunks(self, rid: str, stream: RequestStream, params: SamplingParams,
                                 echoes: list[str], prompts, include_usage: bool, use_beam: bool):
        created, n = int(time.time()), params.n
        index_of = {r: i for i, r in enumerate(stream.request_ids)}
        holdback = max((len(s) for s in params.stop), default=1) - 1
        states: dict[int, ChoiceState] = {}
        completion_tokens: dict[int, int] = {}

        def chunk(index: int, text: str, lp=None, finish=None, stop_reason=None) -> str:
            c = P.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish,
                                   stop_reason=stop_reason)
            return sse(P.CompletionResponse(id=rid, created=created, model=self.model_name,
                                            choices=[c]).model_dump_json(exclude={"usage"}))

        try:
            for i, echo in enumerate(echoes):
                for j in range(n):
                    if echo:
                        yield chunk(i * n + j, echo)
            async for batch in stream.updates():
                for out in batch:
                    base = index_of[out.request_id] * n
                    for o in out.outputs[:n]:  # a beam search returns its n best
                        index = base + o.index
                        state = states.setdefault(index, ChoiceState())
                        d = next_delta(state, o, holdback)
                        if d is None:
                            continue
                        completion_tokens[index] = len(o.token_ids)
                        lp = None
                        if params.logprobs is not None:
                            lp = await self.tokens.run(self._completion_logprobs, d.token_ids,
                                                       d.logprobs, state.offset)
                            state.offset += sum(len(t) for t in lp.tokens)
                        yield chunk(index, d.text, lp, d.finish_reason,
                                    None if use_beam else d.stop_reason)
            if include_usage:
                usage = usage_info(sum(len(ids) for _, ids in prompts),
                                   sum(completion_tokens.values()))
                yield sse(P.CompletionResponse(id=rid, created=created, model=self.model_name,
                                               choices=[], usage=usage).model_dump_json())
        except RequestFailedError as e:
            yield sse(APIError(e.status, str(e), type="server_error",
                               code=e.code).body().model_dump_json())
        yield sse("[DONE]")

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def _chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use "
                                "/v1/completions", param="messages")
        try:
            messages = text_messages(req.messages)
            return await self.tokens.admit(
                lambda: chat_prompt_ids(tok, messages, req.add_generation_prompt,
                                        parse_special=self.parse_special_tokens_in_chat))
        except ChatPromptError as e:
            raise APIError(400, str(e), param="messages") from None

    @staticmethod
    def _chat_max_tokens(req: P.ChatCompletionRequest) -> tuple[int | None, str]:
        """The completion's token limit and the field that set it: max_completion_tokens, or
        max_tokens (its older name); both only if they agree."""
        given = [(name, getattr(req, name)) for name in ("max_completion_tokens", "max_tokens")
                 if getattr(req, name) is not None]
        if len(given) == 2 and given[0][1] != given[1][1]:
            raise APIError(400, f"max_completion_tokens ({given[0][1]}) and max_tokens "
                                f"({given[1][1]}) differ: send one (max_tokens is the older name)",
                           param="max_completion_tokens")
        for name, value in given:
            if value < 1:
                raise APIError(400, f"{name} must be at least 1, got {value}", param=name)
        return (given[0][1], given[0][0]) if given else (None, "max_completion_tokens")

    async def create_chat_completion(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        self._check_unsupported(req, req.logprobs)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens, max_tokens_field = self._chat_max_tokens(req)
        params = self._params(req, max_tokens=max_tokens, best_of=None,
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        ids = await self._chat_prompt(req)
        self._check_length(ids, max_tokens, max_tokens_field)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._submit([Submission(rid, ids, self._engine_params(req, params, ids))])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._streaming(self._chat_chunks(rid, stream, params, len(ids), include_usage,
                                                     req.use_beam_search), stream)
        final = await self._collect(stream, raw)
        if final is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        outs = final[rid].outputs[:params.n]  # a beam search returns its n best
        choices = [P.ChatChoice(
            index=j, message=P.AssistantMessage(content=o.text),
            logprobs=await self._chat_logprobs(o.token_ids, o.logprobs, params.logprobs),
            finish_reason=openai_finish(o.finish_reason), stop_reason=stop_reason(req, o))
            for j, o in enumerate(outs)]
        usage = usage_info(len(ids), sum(len(o.token_ids) for o in outs))
        return json_response(P.ChatCompletionResponse(id=rid, model=self.model_name,
                                                      choices=choices, usage=usage))

    async def _chat_logprobs(self, token_ids: list[int], tops: list[dict[int, float]] | None,
                             k: int | None) -> P.ChatLogprobs | None:
        if k is None:
            return None
        return await self.tokens.run(self._chat_logprobs_now, token_ids, tops, k)

    def _chat_logprobs_now(self, token_ids: list[int], tops: list[dict[int, float]] | None,
                           k: int) -> P.ChatLogprobs:

        def entry(t: int, lp: float) -> dict:
            tok = self._decode([t])
            return dict(token=tok, logprob=lp, bytes=list(tok.encode("utf-8")))

        return P.ChatLogprobs(content=[
            P.ChatTokenLogprob(**entry(t, top.get(t)), top_logprobs=[
                P.TopLogprob(**entry(i, lp)) for i, lp in best_first(top)[:k]])
            for t, top in zip(token_ids, tops or [])])

    async def _chat_chunks(self, rid: str, stream: RequestStream, params: SamplingParams,
                           prompt_tokens: int, include_usage: bool, use_beam: bool):
        created = int(time.time())
        holdback = max((len(s) for s in params.stop), default=1) - 1
        states = [ChoiceState() for _ in range(params.n)]
        completion_tokens = [0] * params.n

        def chunk(choices: list[P.ChatChunkChoice], usage=None) -> str:
            c = P.ChatCompletionChunk(id=rid, created=created, model=self.model_name,
                                      choices=choices, usage=usage)
            return sse(c.model_dump_json(exclude=None if usage else {"usage"}))

        try:
            for j in range(params.n):
                yield chunk([P.ChatChunkChoice(index=j, delta=P.DeltaMessage(role="assistant",
                                                                             content=""))])
            async for batch in stream.updates():
                for o in (o for out in batch for o in out.outputs[:params.n]):
                    d = next_delta(states[o.index], o, holdback)
                    if d is None:
                        continue
                    completion_tokens[o.index] = len(o.token_ids)
                    yield chunk([P.ChatChunkChoice(
                        index=o.index, delta=P.DeltaMessage(content=d.text or None),
                        logprobs=await self._chat_logprobs(d.token_ids, d.logprobs,
                                                           params.logprobs),
                        finish_reason=d.finish_reason,
                        stop_reason=None if use_beam else d.stop_reason)])
            if include_usage:
                yield chunk([], usage_info(prompt_tokens, sum(completion_tokens)))
        except RequestFailedError as e:
            yield sse(APIError(e.status, str(e), type="server_error",
                               code=e.code).body().model_dump_json())
        yield sse("[DONE]")


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass

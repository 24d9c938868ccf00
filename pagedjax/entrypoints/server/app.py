"""The FastAPI app: routes, OpenAI-style errors for everything, and a guard in front (headers,
API key, body size and read time) that answers before any body is parsed."""
from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from pagedjax.entrypoints.server import protocol as P
from pagedjax.entrypoints.server.engine_loop import AsyncEngine, EngineDeadError
from pagedjax.entrypoints.server.kv_status import kv_status
from pagedjax.entrypoints.server.responses import APIError
from pagedjax.entrypoints.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

MiB = 1 << 20


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


_JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "an array", dict: "an object", type(None): "null"}


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, one line per bad field."""
    # top-level field -> (full path of its first error, its messages: several for a union)
    fields: dict[str, tuple[str, list[str]]] = {}
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return APIError(400, f"malformed JSON body: {detail}".rstrip(": "))
        if e.get("type") == "invalid_unicode":  # found by a model validator: its path is in ctx
            loc = e["ctx"]["field"].split(".")
        else:
            loc = [str(x) for x in e.get("loc", ())][1:] or ["body"]  # loc[0] is "body"
        msg = e.get("msg")
        if e.get("type", "").endswith("_type") and type(e.get("input")) in _JSON_TYPES:
            msg = f"{msg}, got {_JSON_TYPES[type(e['input'])]}"  # strict types: say what came
        _, msgs = fields.setdefault(loc[0], (".".join(loc), []))
        if msg not in msgs:
            msgs.append(msg)
    # a union's errors carry the member types in their paths ("prompt.list[int]"): name the field
    parts = [f"{path if len(msgs) == 1 else field}: {' or '.join(msgs[:3])}"
             for field, (path, msgs) in fields.items()]
    return APIError(400, "invalid request: " + "; ".join(parts[:4]), param=next(iter(fields)))


class RequestGuard:
    """Pure ASGI middleware in front of every route. It refuses, before any body is parsed: a
    request with more than one Authorization header (a proxy checking the first must not be
    fooled by the last), a wrong API key on /v1 routes, and a body over ``max_request_bytes`` -
    at once when Content-Length says so, without waiting for a body that may never come (uvicorn
    discards what does come, within the connection's deadline: server/timeouts.py). It then reads
    the body, which must arrive within ``body_timeout`` seconds (else 408), and replays it."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, body_timeout: float):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_bytes = max_request_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, error = None, self._check_headers(scope)
        if error is None:
            body, error = await self._read_body(receive)
        if error is not None:
            return await _error_response(error)(scope, receive, send)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_headers(self, scope) -> APIError | None:
        auth = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(auth) > 1:
            return APIError(400, f"the request has {len(auth)} Authorization headers: send "
                                 "exactly one", param="Authorization", code="duplicate_header")
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(auth[0] if auth else b"", self.expected):
                return APIError(401, "Incorrect API key provided: pass it as 'Authorization: "
                                     "Bearer <key>'", code="invalid_api_key")
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared and declared[0].isdigit() and int(declared[0]) > self.max_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over the limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)", code="request_too_large")

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        """(the body, None); (None, None) when the client disconnected; (None, error) for a body
        too large or too slow."""
        body, more = bytearray(), True
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(
                    receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return None, APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s "
                         "(--body-timeout)", code="request_timeout",
                    headers={"Connection": "close"})
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return None, self._too_large()
        return bytes(body), None


def build_app(aengine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              max_request_bytes: int = MiB, max_waiting_requests: int = 1024,
              max_logprobs: int = 20, max_n: int | None = None,
              root: str | None = None, body_timeout: float = 30.0,
              max_tokenizer_queue: int | None = None,
              parse_special_tokens_in_chat: bool = False) -> FastAPI:
    serving = OpenAIServing(aengine, served_model_name, max_waiting_requests=max_waiting_requests,
                            max_logprobs=max_logprobs, max_n=max_n,
                            max_tokenizer_queue=max_tokenizer_queue,
                            parse_special_tokens_in_chat=parse_special_tokens_in_chat)
    app = FastAPI(title="pagedjax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: "
                                        f"{exc.detail}", code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        type="server_error"))

    @app.get("/health")
    async def health():
        if aengine.draining:
            return _error_response(APIError(503, "the server is shutting down",
                                            type="server_error", code="shutting_down"))
        if not aengine.is_alive:
            return _error_response(APIError(503, "the engine is not running", type="server_error",
                                            code="engine_dead"))
        if aengine.engine.fault is not None:  # a step failed and its reset has not finished
            return _error_response(APIError(503, f"the engine is recovering from a failed step: "
                                            f"{aengine.engine.fault}", type="server_error",
                                            code="engine_recovering"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(aengine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/kv")
    async def kv():
        """Who holds which KV block (pagedjax.kv_view); what ``pagedjax top`` shows."""
        try:
            body = await kv_status(aengine)
        except EngineDeadError as e:
            raise APIError(503, str(e), type="server_error", code="engine_dead") from None
        return Response(body, media_type="application/json")

    @app.get("/v1/models")
    async def models():
        card = P.ModelCard(id=served_model_name, root=root or served_model_name,
                           max_model_len=serving.max_model_len)
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        return await serving.create_completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await serving.create_chat_completion(body, request)

    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout=body_timeout)
    return app


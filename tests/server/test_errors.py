"""Every bad input gets the right status and an OpenAI error body, and the next good request still
succeeds."""
import json

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL

GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


DROP = object()


def _raw(body: dict) -> bytes:
    """``body`` as JSON bytes with non-ASCII escaped: the only way a lone surrogate travels."""
    return json.dumps(body, ensure_ascii=True).encode()


def completion(**changes):
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not DROP}

MATRIX = [  # (name, path, body (dict: JSON; bytes: raw), headers, status, message fragment, param)
    ("missing prompt", "/v1/completions", completion(prompt=DROP), {}, 400, "prompt", "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, {}, 400, "messages",
     "messages"),
    ("prompt of wrong type", "/v1/completions", completion(prompt=123), {}, 400, "prompt",
     "prompt"),
    ("max_tokens of wrong type", "/v1/completions", completion(max_tokens="lots"), {}, 400,
     "max_tokens", "max_tokens"),
    ("empty prompt list", "/v1/completions", completion(prompt=[]), {}, 400, "empty", "prompt"),
    ("token id outside the vocabulary", "/v1/completions", completion(prompt=[5, 999]), {}, 400,
     "outside the vocabulary", "prompt"),
    ("prompt over max_model_len", "/v1/completions", completion(prompt="x" * 80), {}, 400,
     "max_model_len is 64", "prompt"),
    ("max_tokens over the limit", "/v1/completions", completion(max_tokens=100), {}, 400,
     "maximum context length is 64", "max_tokens"),
    ("chat max_tokens over the limit", "/v1/chat/completions", {**CHAT, "max_tokens": 64}, {},
     400, "maximum context length", "max_tokens"),
    ("max_tokens 0", "/v1/completions", completion(max_tokens=0), {}, 400, "max_tokens",
     "max_tokens"),
    ("negative temperature", "/v1/completions", completion(temperature=-0.5), {}, 400,
     "temperature", "temperature"),
    ("top_p over 1", "/v1/completions", completion(top_p=1.5), {}, 400, "top_p", "top_p"),
    ("top_p 0", "/v1/chat/completions", {**CHAT, "top_p": 0}, {}, 400, "top_p", "top_p"),
    ("n 0", "/v1/completions", completion(n=0), {}, 400, "n must be", "n"),
    ("too many logprobs", "/v1/completions", completion(logprobs=50), {}, 400, "logprobs",
     "logprobs"),
    ("beam search with logprobs", "/v1/completions", completion(use_beam_search=True,
                                                                logprobs=1), {}, 400,
     "not supported with use_beam_search", "logprobs"),
    ("beam search with temperature", "/v1/completions", completion(use_beam_search=True,
                                                                   temperature=0.7), {}, 400,
     "temperature must be 0", "use_beam_search"),
    ("presence penalty out of range", "/v1/completions", completion(presence_penalty=2.5), {},
     400, "[-2, 2]", "presence_penalty"),
    ("frequency penalty out of range", "/v1/chat/completions",
     {**CHAT, "frequency_penalty": -3}, {}, 400, "[-2, 2]", "frequency_penalty"),
    ("repetition penalty 0", "/v1/completions", completion(repetition_penalty=0), {}, 400,
     "> 0", "repetition_penalty"),
    ("negative min_tokens", "/v1/completions", completion(min_tokens=-1), {}, 400, "min_tokens",
     "min_tokens"),
    ("min_tokens over max_tokens", "/v1/chat/completions", {**CHAT, "min_tokens": 5}, {}, 400,
     "must not exceed max_tokens", "min_tokens"),
    ("too many prompt logprobs", "/v1/completions", completion(prompt_logprobs=50), {}, 400,
     "over the maximum", "prompt_logprobs"),
    ("echo + logprobs streamed", "/v1/completions",
     completion(echo=True, logprobs=1, stream=True), {}, 400, "streaming", "echo"),
    ("beam search with a penalty", "/v1/completions",
     completion(use_beam_search=True, repetition_penalty=1.2), {}, 400,
     "not supported with use_beam_search", "repetition_penalty"),
    ("response_format json", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_object"}}, {}, 400, "response_format",
     "response_format"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {}}}]}, {}, 400, "tools", "tools"),
    ("tool_choice", "/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, {}, 400,
     "tool_choice", "tool_choice"),
    ("functions", "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, {}, 400,
     "functions", "functions"),
    ("function_call", "/v1/chat/completions", {**CHAT, "function_call": "auto"}, {}, 400,
     "function_call", "function_call"),
    ("parallel_tool_calls", "/v1/chat/completions", {**CHAT, "parallel_tool_calls": True}, {},
     400, "parallel_tool_calls", "parallel_tool_calls"),
    ("logit_bias", "/v1/completions", completion(logit_bias={"5": 10}), {}, 400, "logit_bias",
     "logit_bias"),
    ("suffix", "/v1/completions", completion(suffix="end"), {}, 400, "suffix", "suffix"),
    ("chat role wizard", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, "'wizard'",
     "messages"),
    ("image content", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 400,
     "only text", "messages"),
    ("unknown model", "/v1/completions", completion(model="gpt-5"), {}, 404, "does not exist",
     "model"),
    ("unknown model (chat)", "/v1/chat/completions", {**CHAT, "model": "gpt-5"}, {}, 404,
     "does not exist", "model"),
    ("wrong key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "API key",
     None),
    ("no key", "/v1/models", None, {"Authorization": ""}, 401, "API key", None),
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": "hi",', {}, 400,
     "malformed JSON", None),
    ("oversized body", "/v1/completions",
     json.dumps(completion(prompt="a" * (2 << 20))).encode(), {}, 413, "over the limit", None),
    ("unknown route", "/v1/embeddings", GOOD, {}, 404, "Not Found", None),
    # strict types: no string, boolean or fraction is taken for a number
    ("max_tokens as a string", "/v1/completions", completion(max_tokens="5"), {}, 400,
     "max_tokens: Input should be a valid integer, got a string", "max_tokens"),
    ("max_tokens as a boolean", "/v1/completions", completion(max_tokens=True), {}, 400,
     "got a boolean", "max_tokens"),
    ("n as a fraction", "/v1/completions", completion(n=1.5), {}, 400, "got a number", "n"),
    ("temperature as a string", "/v1/completions", completion(temperature="0.5"), {}, 400,
     "temperature: Input should be a valid number, got a string", "temperature"),
    ("seed as a boolean", "/v1/completions", completion(seed=False), {}, 400, "seed", "seed"),
    ("logprobs as a boolean", "/v1/completions", completion(logprobs=True), {}, 400,
     "logprobs", "logprobs"),
    ("stream as a string", "/v1/completions", completion(stream="yes"), {}, 400,
     "valid boolean", "stream"),
    ("token id as a boolean", "/v1/completions", completion(prompt=[5, True]), {}, 400,
     "prompt", "prompt"),
    ("include_usage as a string", "/v1/completions",
     completion(stream=True, stream_options={"include_usage": "true"}), {}, 400,
     "stream_options.include_usage", "stream_options"),
    ("chat top_logprobs as a string", "/v1/chat/completions",
     {**CHAT, "logprobs": True, "top_logprobs": "2"}, {}, 400, "top_logprobs", "top_logprobs"),
    ("chat role as a number", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": 1, "content": "hi"}]}, {}, 400, "messages.0.role",
     "messages"),
    ("chat max_completion_tokens 0", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "max_completion_tokens": 0}, {}, 400,
     "max_completion_tokens must be at least 1", "max_completion_tokens"),
    ("chat max_tokens 0", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, {}, 400,
     "max_tokens must be at least 1", "max_tokens"),
    ("chat max_completion_tokens and max_tokens differ", "/v1/chat/completions",
     {**CHAT, "max_tokens": 3, "max_completion_tokens": 4}, {}, 400, "differ",
     "max_completion_tokens"),
    ("chat max_completion_tokens over the limit", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "max_completion_tokens": 64}, {}, 400,
     "maximum context length", "max_completion_tokens"),
    # invalid Unicode (JSON's escapes carry lone UTF-16 surrogates), wherever it is
    ("lone surrogate in prompt", "/v1/completions", _raw(completion(prompt="a\ud800b")), {},
     400, "prompt: not valid Unicode", "prompt"),
    ("lone surrogate in model", "/v1/completions", _raw(completion(model="t\udfffiny")), {},
     400, "model: not valid Unicode", "model"),
    ("lone surrogate in a prompt list", "/v1/completions",
     _raw(completion(prompt=["ok", "\udc00"])), {}, 400, "prompt.1: not valid Unicode",
     "prompt"),
    ("lone surrogate in stop", "/v1/completions", _raw(completion(stop=["x", "a\ud800"])), {},
     400, "stop.1: not valid Unicode", "stop"),
    ("lone surrogate in user", "/v1/completions", _raw(completion(user="\ud800")), {}, 400,
     "user: not valid Unicode", "user"),
    ("lone surrogate in a field we ignore", "/v1/completions",
     _raw(completion(metadata={"tag": "\ud800"})), {}, 400, "metadata.tag: not valid Unicode",
     "metadata"),
    ("lone surrogate in a key", "/v1/completions", _raw(completion(logit_bias={"\ud800": 1})),
     {}, 400, "logit_bias.<key>: not valid Unicode", "logit_bias"),
    ("lone surrogate in chat content", "/v1/chat/completions",
     _raw({**CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]}), {}, 400,
     "messages.0.content: not valid Unicode", "messages"),
    ("lone surrogate in a content part", "/v1/chat/completions",
     _raw({**CHAT, "messages": [{"role": "user", "content": [{"type": "text",
                                                               "text": "\udbff"}]}]}),
     {}, 400, "messages.0.content.0.text: not valid Unicode", "messages"),
    ("lone surrogate in chat role", "/v1/chat/completions",
     _raw({**CHAT, "messages": [{"role": "us\ud800er", "content": "hi"}]}), {}, 400,
     "messages.0.role: not valid Unicode", "messages"),
    ("surrogate as raw bytes", "/v1/completions",
     b'{"model": "tiny", "prompt": "a\xed\xa0\x80b", "max_tokens": 2}', {}, 400,
     "not valid Unicode", "prompt"),
]


@pytest.mark.parametrize("name, path, body, headers, status, fragment, param", MATRIX,
                         ids=[m[0] for m in MATRIX])
def test_bad_input_gets_openai_error_then_server_still_serves(server, name, path, body, headers,
                                                              status, fragment, param):
    with server.http() as http:
        if body is None:
            r = http.get(path, headers=headers)
        elif isinstance(body, bytes):
            r = http.post(path, content=body,
                          headers={"Content-Type": "application/json", **headers})
        else:
            r = http.post(path, json=body, headers=headers)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert fragment in err["message"], err
        if param is not None:
            assert err["param"] == param, err
        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200, good.text
        assert good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.aengine.is_alive


def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hello", max_tokens=1000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hello")
    with pytest.raises(openai.AuthenticationError):
        server.client().with_options(api_key="wrong").models.list()
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


def test_chunked_body_over_the_limit_is_413_too(server):
    def body():  # no Content-Length: the guard must count what arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    with server.http() as http:
        r = http.post("/v1/completions", content=body(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
        assert http.post("/v1/completions", json=GOOD).status_code == 200


@pytest.mark.parametrize("keys", [[API_KEY, "nope"], ["nope", API_KEY], [API_KEY, API_KEY]])
def test_two_authorization_headers_are_refused(server, keys):
    """A proxy that checks the first header and a server that reads the last would disagree."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/completions", json=GOOD,
                      headers=[("Authorization", f"Bearer {k}") for k in keys])
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "2 Authorization headers" in err["message"] and err["param"] == "Authorization"
        r = http.post("/v1/completions", json=GOOD, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200, r.text

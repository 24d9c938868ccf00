"""Input safety: caps on what one request may ask for (token ids, max_tokens, n / best_of, prompt
count, sampling values), no pickle and no model-folder code ever loaded, the API key compared in
constant time."""
from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import pickle
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from pagedjax.models import ModelConfig, load_model
from pagedjax.models.hf import HUB_PATTERNS
from pagedjax.models.params import param_shapes
from tests.reliability.conftest import MAX_WAITING
from tests.server.conftest import API_KEY, MODEL

ROOT = Path(__file__).resolve().parents[2]
HF_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
           "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

CAPS = [  # (name, path, body, status, message fragment, param)
    ("negative token id", "/v1/completions", {**GOOD, "prompt": [5, -1]}, 400,
     "outside the vocabulary", "prompt"),
    ("huge token id", "/v1/completions", {**GOOD, "prompt": [2**40]}, 400,
     "outside the vocabulary", "prompt"),
    ("token id out of range in a batch", "/v1/completions", {**GOOD, "prompt": [[5], [128]]},
     400, "outside the vocabulary", "prompt"),
    ("empty token list in a batch", "/v1/completions", {**GOOD, "prompt": [[5], []]}, 400,
     "empty", "prompt"),
    ("huge max_tokens", "/v1/completions", {**GOOD, "max_tokens": 10**12}, 400,
     "maximum context length", "max_tokens"),
    ("negative max_tokens", "/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens",
     "max_tokens"),
    ("huge max_completion_tokens", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "max_completion_tokens": 10**9}, 400, "maximum context length",
     "max_completion_tokens"),
    ("max_tokens as a string", "/v1/completions", {**GOOD, "max_tokens": "5"}, 400,
     "valid integer", "max_tokens"),
    ("max_tokens as a boolean", "/v1/chat/completions", {**CHAT, "max_tokens": True}, 400,
     "valid integer", "max_tokens"),
    ("n as a fraction", "/v1/completions", {**GOOD, "n": 1.5}, 400, "valid integer", "n"),
    ("temperature as a string", "/v1/chat/completions", {**CHAT, "temperature": "0.5"}, 400,
     "valid number", "temperature"),
    ("max_completion_tokens 0", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "max_completion_tokens": 0}, 400, "at least 1",
     "max_completion_tokens"),
    ("negative max_completion_tokens", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "max_completion_tokens": -1}, 400, "at least 1",
     "max_completion_tokens"),
    ("chat max_tokens 0", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "at least 1",
     "max_tokens"),
    ("huge n", "/v1/completions", {**GOOD, "n": 10**9}, 400, "--max-n", "n"),
    ("n over --max-n", "/v1/chat/completions", {**CHAT, "n": 5}, 400, "--max-n", "n"),
    ("huge best_of", "/v1/completions", {**GOOD, "best_of": 10**6}, 400, "--max-n", "best_of"),
    ("huge beam", "/v1/completions", {**GOOD, "use_beam_search": True, "n": 10**6}, 400,
     "--max-n", "n"),
    ("more prompts than the queue", "/v1/completions",
     {**GOOD, "prompt": [[5]] * (MAX_WAITING + 1)}, 400, "split the request", "prompt"),
    ("huge logprobs", "/v1/completions", {**GOOD, "logprobs": 10**9}, 400, "logprobs",
     "logprobs"),
    ("huge top_k", "/v1/completions", {**GOOD, "top_k": 2**40}, 400, "top_k", "top_k"),
    ("huge length_penalty", "/v1/completions",
     {**GOOD, "use_beam_search": True, "n": 2, "length_penalty": 1e308}, 400, "length_penalty",
     "use_beam_search"),
    ("huge stop token id", "/v1/completions", {**GOOD, "stop_token_ids": [2**70]}, 200, None,
     None),
    ("huge seed", "/v1/completions", {**GOOD, "seed": -(2**70), "temperature": 0.5}, 200, None,
     None),
]


@pytest.mark.parametrize("name, path, body, status, fragment, param", CAPS,
                         ids=[c[0] for c in CAPS])
def test_request_caps(rel_server, name, path, body, status, fragment, param):
    with rel_server.http() as http:
        r = http.post(path, json=body)
        assert r.status_code == status, r.text
        if status != 200:
            err = r.json()["error"]
            assert fragment in err["message"] and err["param"] == param, err
        assert http.post("/v1/completions", json=GOOD).status_code == 200
        assert http.get("/health").status_code == 200


def test_non_finite_numbers_are_refused(rel_server):
    """Python's JSON parser takes NaN and Infinity; sampling values must still be sane."""
    with rel_server.http() as http:
        for field, value in (("temperature", "NaN"), ("top_p", "NaN"), ("min_p", "NaN"),
                             ("temperature", "Infinity"), ("length_penalty", "NaN")):
            extra = ', "use_beam_search": true' if field == "length_penalty" else ""
            raw = (f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, '
                   f'"{field}": {value}{extra}}}')
            r = http.post("/v1/completions", content=raw,
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)


UNICODE = [  # (path, body with a lone surrogate somewhere, the field named)
    ("/v1/completions", {**GOOD, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {**GOOD, "model": "\ud800"}, "model"),
    ("/v1/completions", {**GOOD, "stop": "\udfff"}, "stop"),
    ("/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x<|im_end|>\ud800"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi",
                                                    "name": "\ud800"}]}, "messages"),
]


@pytest.mark.parametrize("path, body, field", UNICODE, ids=[u[2] for u in UNICODE])
def test_invalid_unicode_is_a_400_and_no_traceback(rel_server, caplog, monkeypatch, path, body,
                                                   field):
    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to caplog's root
    monkeypatch.setattr(uvicorn_log, "handlers", [*uvicorn_log.handlers, caplog.handler])
    with rel_server.http() as http, caplog.at_level(logging.INFO):
        r = http.post(path, content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
        ok = {**body, field: GOOD.get(field, CHAT.get(field))}
        assert http.post(path, json=ok).status_code == 200
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


def test_max_completion_tokens_is_honoured(rel_server):
    body = {**CHAT, "max_tokens": None, "max_completion_tokens": 2, "ignore_eos": True}
    with rel_server.http() as http:
        for extra in ({}, {"max_tokens": 2}):  # alone, or with max_tokens agreeing
            r = http.post("/v1/chat/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
            assert r.json()["choices"][0]["finish_reason"] == "length"


def test_api_key_is_compared_in_constant_time(rel_server, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    expected = f"Bearer {API_KEY}".encode()
    r = httpx.get(f"{rel_server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and calls == [(b"Bearer nope", expected)]
    r = httpx.get(f"{rel_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and calls[-1] == (expected, expected)


def _hf_folder(path: Path, hf: dict = HF_TINY) -> Path:
    """config.json + one safetensors file of the right shapes."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf))
    weights = {n: np.full(s, 0.01, np.float32)
               for n, s in param_shapes(ModelConfig.from_hf(hf)).items()}
    save_file(weights, str(path / "model.safetensors"))
    return path


class _Boobytrap:
    """Unpickling this touches ``marker``: proof that a loader ran pickle on a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("with_safetensors", [False, True])
def test_pickle_checkpoints_are_never_loaded(tmp_path, with_safetensors):
    folder = tmp_path / "model"
    if with_safetensors:
        _hf_folder(folder)
    else:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(HF_TINY))
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Boobytrap(marker)))
    if with_safetensors:
        assert load_model(str(folder), dtype="float32").cfg.vocab_size == HF_TINY["vocab_size"]
    else:
        with pytest.raises(FileNotFoundError, match=r"safetensors only, not PyTorch \.bin"):
            load_model(str(folder))
    assert not marker.exists(), "a pickle was loaded"
    assert not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_PATTERNS
                   for name in ("pytorch_model.bin", "model.pt", "model.pkl", "modeling_x.py"))


def test_model_folder_code_never_runs(tmp_path, monkeypatch):
    """A folder whose config and tokenizer point at their own code (auto_map): the model loads
    with pagedjax's decoder, the custom tokenizer is refused, and its code is never imported,
    even with "y" on stdin (transformers asks there unless told trust_remote_code=False)."""
    folder = _hf_folder(tmp_path / "model", hf={**HF_TINY, "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}})
    marker = tmp_path / "ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(code + f"class Evil{module}: pass\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.cfg.family == "llama" and loaded.tokenizer is None
    assert not marker.exists(), "code from the model folder ran"


SOURCES = list((ROOT / "pagedjax").rglob("*.py"))  # kernels/ and models/ included
FORBIDDEN = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|"
                       r"trust_remote_code\s*=\s*True|\beval\(|\bexec\(|yaml\.load\(")


def test_no_source_unpickles_or_trusts_remote_code():
    assert len(SOURCES) > 20
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not hits, hits
    # every transformers loader call says trust_remote_code=False (None would ask on stdin)
    for p in SOURCES:
        text = p.read_text()
        calls = re.findall(r"from_pretrained\((.*?)\)\n", text, flags=re.S)
        for args in calls:
            assert "trust_remote_code=False" in args, f"{p.relative_to(ROOT)}: {args}"


def test_server_binds_localhost_by_default(rel_server):
    from pagedjax.entrypoints.server import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"
    assert rel_server.url.startswith("http://127.0.0.1:")

"""A real server on 127.0.0.1 (uvicorn in a thread) over the tiny Qwen with a tiny char-level
tokenizer, and a reference ``LLM`` with the same engine arguments.

The engine arguments pin every step to one bucket shape (16 tokens x 4 sequences x 4 blocks), so
the whole module compiles the step once per engine."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import string
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pagedjax import LLM
from pagedjax.entrypoints.server import add_arguments, build_server

API_KEY = "sk-test-key"
MODEL = "tiny"
ENGINE_ARGS = dict(max_model_len=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=16,
                   num_gpu_blocks_override=64)
SPECIAL = ["<unk>", "</s>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(vocab_size: int = 128):
    """One token per printable ASCII character plus specials, padded with word tokens to exactly
    the model's vocabulary, so every id the random model samples decodes to something."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    fill = [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(chars))]
    vocab = {t: i for i, t in enumerate(SPECIAL + chars + fill)}
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tok_model(tiny_qwen):
    return dataclasses.replace(tiny_qwen, tokenizer=char_tokenizer(tiny_qwen.cfg.vocab_size))


@pytest.fixture(scope="session")
def ref_llm(tok_model):
    return LLM(loaded=tok_model, **ENGINE_ARGS)


def server_argv(**extra) -> list[str]:
    argv = ["--port", "0", "--api-key", API_KEY, "--served-model-name", MODEL,
            "--log-stats-interval", "0.3", "--uvicorn-log-level", "warning"]
    for k, v in {**ENGINE_ARGS, **extra}.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


@dataclasses.dataclass
class Running:
    url: str
    server: object
    thread: threading.Thread

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def start_uvicorn(server) -> Running:
    server.config.timeout_graceful_shutdown = 2
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    return Running(f"http://{host}:{port}", server, thread)


@contextlib.contextmanager
def another_app(aengine, *, header_timeout: float = 10.0, **app_kw):
    """A second app and uvicorn over ``aengine`` (no new engine, no compile) with other server
    options; yields its URL."""
    from pagedjax.entrypoints.server.app import build_app
    from pagedjax.entrypoints.server.timeouts import uvicorn_config

    app = build_app(aengine, MODEL, API_KEY, **app_kw)
    config = uvicorn_config(app, "127.0.0.1", 0, log_level="warning",
                            header_timeout=header_timeout,
                            linger_timeout=app_kw.get("body_timeout", 30.0))
    running = start_uvicorn(uvicorn.Server(config))
    try:
        yield running.url
    finally:
        running.stop()


@dataclasses.dataclass
class Server:
    url: str
    aengine: object
    app: object

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0,
                             timeout=30, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0,
                                  timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {API_KEY}"})

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(sample name, finished_reason label or ""): value} from GET /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, s.labels.get("finished_reason", "")): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_metric(self, name: str, ok, timeout: float = 10.0, label: str = "") -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get((name, label))
            if value is not None and ok(value):
                return value
            assert time.monotonic() < deadline, f"{name} stayed at {value}"
            time.sleep(0.05)


@pytest.fixture(scope="session")
def server(tok_model):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    uv, aengine = build_server(parser.parse_args(server_argv()), loaded=tok_model)
    running = start_uvicorn(uv)
    yield Server(running.url, aengine, uv.config.app)
    running.stop()
    aengine.shutdown()


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Each engine step takes >= 20 ms, as on a real model, so requests stay in flight long
    enough to be disconnected from or to fill the waiting queue."""
    engine = server.aengine.engine
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    yield engine

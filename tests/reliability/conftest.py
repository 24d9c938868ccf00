"""A real server on 127.0.0.1 for the soak, fault and fuzz tests, with a KV pool too small for
every admitted sequence at full length (so load preempts), and the figures the tests print.

Its engine arguments are the server tests' (one step bucket, one compile) with 10 blocks instead
of 64 and a waiting-queue limit of 8 sequences, so the soak also meets 503s."""
from __future__ import annotations

import argparse
import dataclasses
import threading

import pytest

from pagedjax import LLM
from pagedjax.entrypoints.server import add_arguments, build_server
from tests.server.conftest import ENGINE_ARGS, Server, char_tokenizer, server_argv, start_uvicorn

SOAK_BLOCKS = 10  # 4 running sequences of 64 tokens would need 16
MAX_WAITING = 8
FIGURES: list[str] = []  # printed at the end of the run, passing or not


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("=", "reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def rel_model(tiny_qwen):
    return dataclasses.replace(tiny_qwen, tokenizer=char_tokenizer(tiny_qwen.cfg.vocab_size))


@pytest.fixture(scope="session")
def rel_ref(rel_model):
    """The sequential reference: LLM.generate, one prompt at a time."""
    return LLM(loaded=rel_model, **ENGINE_ARGS)


def _serve(model, *flags: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = server_argv(num_gpu_blocks_override=SOAK_BLOCKS, max_waiting_requests=MAX_WAITING)
    uv, aengine = build_server(parser.parse_args(argv + list(flags)), loaded=model)
    running = start_uvicorn(uv)
    yield Server(running.url, aengine, uv.config.app)
    running.stop()
    aengine.shutdown()


@pytest.fixture(scope="session")
def rel_server(rel_model):
    yield from _serve(rel_model)


@pytest.fixture(scope="session")
def rel_tier_server(rel_model):
    """The same server with prefix caching and its host tier (16 host blocks)."""
    yield from _serve(rel_model, "--enable-prefix-caching", "--kv-offloading-size", "1",
                      "--num-cpu-blocks-override", "16")


def on_engine_thread(aengine, fn, timeout: float = 10.0):
    """Run ``fn(engine)`` between two steps on the engine thread (the only one that may touch the
    engine) and return its result."""
    done, box = threading.Event(), {}

    def command():
        try:
            box["value"] = fn(aengine.engine)
        except BaseException as e:  # handed to the caller
            box["error"] = e
        done.set()

    aengine._commands.put(command)
    assert done.wait(timeout), "the engine thread did not run the command"
    if "error" in box:
        raise box["error"]
    return box["value"]

"""GET /v1/kv and ``pagedjax top`` against a live server on 127.0.0.1.

The main test runs ``python -m pagedjax top`` in a real pseudo-terminal while requests run on a
server whose pool (8 blocks of 16 tokens) is too small for them: an n = 2 request shares its
prompt's blocks and the youngest requests are preempted; the screen must show both (a shared
block count and preemption counts, pool-wide and on a request's row) and the request rows. ``PAGEDJAX_TOP_CAPTURE=path`` writes the screen that showed them (the README's capture).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import httpx
import pytest

from pagedjax.entrypoints import cli
from pagedjax.entrypoints.server import add_arguments, build_server
from pagedjax.entrypoints.server.kv_status import MIN_INTERVAL_S, KVBoard
from tests.server.conftest import API_KEY, MODEL, Server, server_argv, start_uvicorn

ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
ROW = re.compile(r"│(cmpl-[^│]*)│\s*(running|waiting|preempted|swapped)\s*│(.*)│")


@pytest.fixture(scope="module")
def small_server(tok_model):
    """The test server with 8 KV blocks and prefix caching."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = server_argv(num_gpu_blocks_override=8) + ["--enable-prefix-caching"]
    uv, aengine = build_server(parser.parse_args(argv), loaded=tok_model)
    running = start_uvicorn(uv)
    yield Server(running.url, aengine, uv.config.app)
    running.stop()
    aengine.shutdown()


class Terminal:
    """A pseudo-terminal of ``cols`` x ``rows`` running ``argv``; ``frames()`` is what was drawn,
    one string per redraw (rich's Live redraws from the top-left corner, ESC [ H)."""

    def __init__(self, argv: list[str], cols: int = 110, rows: int = 40):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     env={**env, "TERM": "xterm-256color"})
        os.close(slave)
        self.raw = b""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 1 << 16)
            except OSError:  # the child closed the terminal
                pass

    def frames(self) -> list[str]:
        return [ANSI.sub(b"", f).decode("utf-8", "replace") for f in self.raw.split(b"\x1b[H")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def what_it_shows(frame: str) -> set[str]:
    """Of what the test looks for, what ``frame`` shows: "rows" (a request row), "shared" (a
    shared block in the pool line), "preemptions" (pool-wide) and "preempted row" (on a row)."""
    shown = set()
    shared = re.search(r"KV pool .* shared (\d+) ", frame)
    total = re.search(r"preemptions (\d+) \(", frame)
    rows = ROW.findall(frame)
    if rows:
        shown.add("rows")
    if shared and int(shared[1]) > 0:
        shown.add("shared")
    if total and int(total[1]) > 0:
        shown.add("preemptions")
    if any(int(cells.split("│")[-1]) > 0 for _, _, cells in rows):
        shown.add("preempted row")
    return shown


WANTED = {"rows", "shared", "preemptions", "preempted row"}


def test_top_shows_sharing_and_preemption_live_in_a_terminal(small_server, monkeypatch):
    engine = small_server.aengine.engine
    step = engine.step

    def slow_step():  # long enough for requests to be seen at each stage
        time.sleep(0.03)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    term = Terminal([sys.executable, "-m", "pagedjax", "top", "--url", small_server.url,
                     "--api-key", API_KEY, "--interval", "0.1"])
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while "pagedjax top" not in "".join(term.frames()):
            assert time.monotonic() < deadline and term.proc.poll() is None, term.raw[-2000:]
            term.read(0.1)

        def complete(prompt: str, n: int, max_tokens: int):
            r = httpx.post(f"{small_server.url}/v1/completions", timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": MODEL, "prompt": prompt, "n": n,
                                 "max_tokens": max_tokens, "ignore_eos": True})
            statuses.append(r.status_code)

        # up to 60 tokens each (4 blocks): n = 2 shares its prompt block, and the three need
        # 15 blocks of the 8 at their longest
        jobs = [threading.Thread(target=complete, args=a)
                for a in (("a" * 20, 2, 40), ("b" * 30, 1, 30), ("c" * 30, 1, 30))]
        for job in jobs:
            job.start()
        deadline = time.monotonic() + 60
        shown: set[str] = set()
        while shown != WANTED:
            assert time.monotonic() < deadline and term.proc.poll() is None, \
                (shown, term.frames()[-1])
            term.read(0.1)
            shown = set().union(*map(what_it_shows, term.frames()[:-1]))
        for job in jobs:
            job.join(120)
        assert statuses == [200, 200, 200]
        term.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        deadline = time.monotonic() + 10
        while term.proc.poll() is None and time.monotonic() < deadline:
            term.read(0.1)
        term.read(0.1)
        assert term.proc.returncode == 0
        assert term.raw.endswith(b"\x1b[?1049l")  # the screen it took over is given back
        assert b"Traceback" not in term.raw
    finally:
        term.close()
    if os.environ.get("PAGEDJAX_TOP_CAPTURE"):  # the frame that shows the most
        frame = max(term.frames()[:-1], key=lambda f: (len(what_it_shows(f)), len(ROW.findall(f))))
        lines = [line.rstrip() for line in frame.replace("\r", "").split("\n")]
        with open(os.environ["PAGEDJAX_TOP_CAPTURE"], "w") as f:
            f.write("\n".join(lines).rstrip() + "\n")


def test_kv_endpoint_needs_the_key_and_describes_the_pool(small_server):
    r = httpx.get(f"{small_server.url}/v1/kv", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{small_server.url}/v1/kv", timeout=10,
                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    view = r.json()
    pool = view["pool"]
    assert pool["num_blocks"] == len(pool["block_map"]) == 8 and pool["block_size"] == 16
    assert pool["used"] + pool["free"] == 8
    assert view["prefix_cache"]["enabled"] and view["host"] is None
    assert set(pool["block_map"]) <= set(pool["legend"])


def test_the_engine_thread_builds_the_view_only_while_someone_watches(small_server):
    engine = small_server.aengine.engine
    board = KVBoard()
    snap = engine.make_stats()
    board.after_step(engine, snap)
    assert board.view is None  # nobody polled: a step builds nothing
    assert board.watch()  # no view yet: the handler asks for one
    board.after_step(engine, snap)
    first = board.view
    assert first is not None and not board.watch()
    board.after_step(engine, snap)
    assert board.view is first  # at most one build per MIN_INTERVAL_S
    time.sleep(MIN_INTERVAL_S)
    board.after_step(engine, snap)
    assert board.view is not first
    assert board.body() is board.body()  # serialised once per view


def test_top_says_what_to_fix_for_a_wrong_key_or_no_server(small_server, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["top", "--url", small_server.url, "--api-key", "wrong", "--once"])
    assert exit_.value.code == 2
    assert "refused the API key" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit):
        cli.main(["top", "--url", f"http://127.0.0.1:{port}", "--once"])
    assert "cannot reach" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["top", "--interval", "0"])
    assert "--interval 0.0 must be > 0" in capsys.readouterr().err
    cli.main(["top", "--url", small_server.url, "--api-key", API_KEY, "--once"])
    assert "KV pool" in capsys.readouterr().out

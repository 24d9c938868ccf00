"""The plumbing of the ``serve`` scenario: a ``pagedjax serve`` child process on 127.0.0.1 (with a
synthetic tokenizer when the model has none), its Prometheus counters, and a streaming async
client with seeded Poisson arrivals under a concurrency cap. Timing follows vLLM's
``bench serve`` client: a request's clock starts when it is sent (after it got a concurrency
slot), TTFT at its first streamed chunk, one ITL per later chunk."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

logger = logging.getLogger(__name__)


# ---- the server ------------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int, folder: Path) -> Path:
    """A word-level tokenizer with exactly ``vocab_size`` tokens, token i spelled "wi"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return folder


def _engine_flags(args, model: str) -> list[str]:
    """The engine flags of this run as `pagedjax serve` arguments (those not at their default)."""
    from pagedjax.config import EngineArgs, add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    out = ["--model", model]
    for f in dataclasses.fields(EngineArgs):
        action, value = flags.get(f.name), getattr(args, f.name, None)
        if f.name == "model" or action is None or value is None or value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --flag / --no-flag
            out += [action.option_strings[0 if value else 1]]
        else:
            out += [action.option_strings[0]] if value is True else [action.option_strings[0],
                                                                     str(value)]
    return out


@contextlib.contextmanager
def started_server(args, vocab_size: int, env: dict):
    """``pagedjax serve`` in a child process on a free 127.0.0.1 port; yields its URL, and stops it
    (SIGTERM, then kill) on the way out. A synthetic tokenizer made for it lives as long as it:
    a second server started with the same ``args`` (the startup scenario's warm start) makes its
    own."""
    given_tokenizer = args.tokenizer
    with tempfile.TemporaryDirectory(prefix="pagedjax-serve-") as tmp:
        model = args.model
        if args.tiny:
            model = str(Path(tmp) / "config.json")
            Path(model).write_text(json.dumps(harness.TINY_HF_CONFIG))
            args.load_format = "dummy"
        if args.tokenizer is None:
            args.tokenizer = str(synthetic_tokenizer(vocab_size, Path(tmp) / "tokenizer"))
        trace = []
        if hasattr(args, "step_trace"):  # the serve scenario reads the server's step trace
            args.step_trace = args.step_trace or str(Path(tmp) / "steps.jsonl")
            trace = ["--step-trace", args.step_trace]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        entry = ["pagedjax.entrypoints.cli", "serve"]
        if getattr(args, "fake_device", False):  # the serve scenario's modelled device
            from benchmarks.modelled_device import StepModel

            entry = ["benchmarks.fake_serve", *StepModel.from_args(args).flags()]
        argv = [sys.executable, "-m", *entry, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", "bench", "--uvicorn-log-level", "warning",
                "--log-stats-interval", "10", "--drain-timeout", "5",
                "--max-waiting-requests", str(max(1024, 2 * args.num_prompts)),
                *trace, *_engine_flags(args, model), *args.server_arg]
        logger.info("starting: %s", " ".join(argv[1:]))
        proc = subprocess.Popen(argv, env=env)
        url = f"http://127.0.0.1:{port}"
        # a SIGTERM (a time limit) must stop the server too: it holds the GPU's memory
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            _wait_healthy(url, proc, args.server_timeout)
            yield url
        finally:
            args.tokenizer = given_tokenizer
            signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _wait_healthy(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`pagedjax serve` exited with {proc.returncode} before it "
                               "answered /health (its log is above)")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"`pagedjax serve` did not answer /health in {timeout:.0f} s "
                               "(--server-timeout)")
        time.sleep(0.5)


def scrape(url: str) -> dict[str, float]:
    """``pagedjax:`` counters from /metrics, summed over labels: {"generation_tokens": ...}."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if not line.startswith("pagedjax:") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{")[0][len("pagedjax:"):]
        if name.endswith("_total"):
            out[name[:-len("_total")]] = out.get(name[:-len("_total")], 0.0) + float(value)
    return out


# ---- the client ------------------------------------------------------------------------------
@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # sending to the last token
    itl: list[float] = dataclasses.field(default_factory=list)
    chunks: int = 0
    start: float = 0.0  # seconds after the run began
    error: str = ""


async def _request(client, payload: dict, prompt_len: int, t_run: float) -> RequestResult:
    res = RequestResult(prompt_len)
    st = time.perf_counter()
    res.start, last, done = st - t_run, st, False
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))[:300]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if res.chunks == 0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last, res.chunks = now, res.chunks + 1
        res.latency = last - st  # vLLM's: until the last token, not the usage chunk or [DONE]
        res.ok = done and res.chunks > 0 and res.output_tokens == payload["max_tokens"]
        if not res.ok:
            res.error = (f"stream ended after {res.chunks} chunks, {res.output_tokens} of "
                         f"{payload['max_tokens']} tokens{'' if done else ', no [DONE]'}")
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


def request_rates(text: str) -> list[float]:
    """``--request-rate``: a comma list of distinct rates > 0 (requests/s) or ``inf``."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(math.isnan(r) or r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give requests/s > 0 or inf, comma separated (e.g. 4,8,inf)")
    if len(set(rates)) < len(rates):
        raise argparse.ArgumentTypeError(f"{text!r}: each rate once")
    return rates


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def arrival_gaps(n: int, rate: float, burstiness: float,
                 seed: int | tuple[int, ...]) -> np.ndarray:
    """Seconds to wait after each of ``n`` requests: gamma(burstiness, 1 / (rate * burstiness))
    gaps (exponential, i.e. Poisson arrivals, at burstiness 1), or zeros for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)


async def run_requests(url: str, api_key: str | None, model: str, prompts: list[list[int]],
                        output_len: int, rate: float, burstiness: float,
                        max_concurrency: int | None, seed: int):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    in_flight, peak = 0, 0

    async def limited(payload, n):
        nonlocal in_flight, peak
        async with sem:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await _request(client, payload, n, t0)
            finally:
                in_flight -= 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(3600.0, connect=60.0)) as client:
        tasks, gaps = [], arrival_gaps(len(prompts), rate, burstiness, seed)
        t0 = time.perf_counter()
        for prompt, gap in zip(prompts, gaps):
            payload = {"model": model, "prompt": prompt, "max_tokens": output_len,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(limited(payload, len(prompt))))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return results, duration, peak



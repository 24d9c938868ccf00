"""``pagedjax serve``: an OpenAI-compatible HTTP server over the paged engine.

    pagedjax serve --model Qwen/Qwen2.5-7B-Instruct --max-model-len 8192 --port 8000

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as SSE), GET /v1/models,
GET /v1/kv (who holds which KV block: ``pagedjax top``'s data), GET /health, GET /metrics
(Prometheus, ``pagedjax:`` names). Binds 127.0.0.1 unless told
otherwise. SIGTERM drains in-flight requests before exiting (server/shutdown.py).

Prompts: a /v1/completions string prompt is tokenised with special-token text parsed, as vLLM
does (a raw prompt is the client's own template, ``<|im_start|>`` and all). Chat message content
is text: special-token text in it never becomes a control token (server/chat_prompt.py), unless
--parse-special-tokens-in-chat, which lets any client forge turns (a system turn, an early end of
its own): use it only with trusted clients.
"""
from __future__ import annotations

import argparse
import logging
import os

from pagedjax.config import EngineArgs, add_engine_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("PAGEDJAX_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1 routes "
                        "(default: $PAGEDJAX_API_KEY, else no key)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model, or the model's name)")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default 1 MiB)")
    g.add_argument("--max-tokenizer-queue", type=int, default=None,
                   help="prompts that may wait for the tokenizer thread; more get 503 (default: "
                        "--max-waiting-requests, so a burst of clients waits for the tokenizer "
                        "rather than being refused while the scheduler has room)")
    g.add_argument("--parse-special-tokens-in-chat", action="store_true",
                   help="parse special-token text in chat message content as control tokens. "
                        "RISK: any client can then forge a system turn; by default it is text")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, counted from the "
                        "connection or the first byte of the request, however it trickles; "
                        "then the connection is closed (default 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's body once its headers arrived "
                        "(else 408), and to finish one the server already refused (else the "
                        "connection is closed) (default 30)")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="answer 503 while this many sequences wait for the scheduler")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs a request may ask for (at most 20)")
    g.add_argument("--max-n", type=int, default=None,
                   help="most samples (n, best_of, beam width) one request may ask for "
                        "(default: --max-num-seqs)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (new ones get "
                        "503) before the rest are aborted and the server exits")
    g.add_argument("--log-stats-interval", type=float, default=5.0,
                   help="seconds between throughput log lines while busy")
    g.add_argument("--disable-log-stats", action="store_true")
    g.add_argument("--step-trace", default=None, metavar="FILE",
                   help="append one JSON line per engine step to FILE: its prefill tokens and "
                        "decode rows, time in the step, between steps and delivering outputs "
                        "(benchmarks serve reads it; off by default)")
    g.add_argument("--metrics-prefix", default="pagedjax",
                   help="the prefix of the /metrics names; 'vllm' serves vLLM's exact names, so "
                        "its Grafana dashboards and alerts work unchanged")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_arguments(parser)


def served_name(args: argparse.Namespace) -> str:
    """--served-model-name, else --model as given (vLLM's rule), else the embedded model's name."""
    if args.served_model_name or args.model:
        return args.served_model_name or args.model
    from pagedjax.models import embedded

    return embedded.GGUF_NAME.split(".")[0]  # "SmolLM2-135M-Instruct"


def build_server(args: argparse.Namespace, loaded=None, execute=None):
    """The engine, its thread, the app and a uvicorn server for ``args``; returns
    (uvicorn.Server, AsyncEngine) with the engine thread started. ``loaded`` (tests) skips
    loading a model; ``execute`` is the engine's fake-device seam (benchmarks/fake_serve.py
    serves with a modelled device step)."""
    from pagedjax.engine import LLMEngine

    from pagedjax.entrypoints.server.app import build_app
    from pagedjax.entrypoints.server.engine_loop import AsyncEngine
    from pagedjax.entrypoints.server.metrics import EngineMetrics, check_prefix
    from pagedjax.entrypoints.server.shutdown import DrainingServer
    from pagedjax.entrypoints.server.timeouts import uvicorn_config

    from pagedjax.worker.sampler import MAX_LOGPROBS

    for flag in ("max_request_bytes", "max_waiting_requests", "max_n", "max_tokenizer_queue"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    for flag in ("timeout_keep_alive", "header_timeout", "body_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be > 0 "
                             "seconds")
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"--max-logprobs {args.max_logprobs} must be in [0, {MAX_LOGPROBS}]: "
                         f"the engine step returns the top {MAX_LOGPROBS}")
    check_prefix(args.metrics_prefix)
    engine = LLMEngine(EngineArgs.from_namespace(args), loaded=loaded, execute=execute)
    name = served_name(args)
    metrics = EngineMetrics(name, prefix=args.metrics_prefix,
                            max_model_len=engine.config.max_model_len)
    for phase, seconds in engine.startup_s.items():
        metrics.startup.labels(name, phase).set(seconds)
    for programs, seconds in engine.precompile_parts.items():
        metrics.precompile.labels(name, programs).set(seconds)
    aengine = AsyncEngine(engine, metrics, log_interval=args.log_stats_interval,
                          log_stats=not args.disable_log_stats,
                          step_trace=args.step_trace).start()
    app = build_app(aengine, name, args.api_key, max_request_bytes=args.max_request_bytes,
                    max_waiting_requests=args.max_waiting_requests,
                    max_logprobs=args.max_logprobs, max_n=args.max_n, root=args.model,
                    body_timeout=args.body_timeout, max_tokenizer_queue=args.max_tokenizer_queue,
                    parse_special_tokens_in_chat=args.parse_special_tokens_in_chat)
    config = uvicorn_config(app, args.host, args.port, log_level=args.uvicorn_log_level,
                            timeout_keep_alive=args.timeout_keep_alive,
                            header_timeout=args.header_timeout, linger_timeout=args.body_timeout)
    return DrainingServer(config, aengine, args.drain_timeout), aengine


def run(args: argparse.Namespace, loaded=None, execute=None) -> None:
    """Build the server (``build_server``'s arguments) and serve until it stops."""
    server, aengine = build_server(args, loaded=loaded, execute=execute)
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)",
                server.config.app.state.serving.model_name, args.host, args.port)
    try:
        server.run()
    finally:
        aengine.shutdown()

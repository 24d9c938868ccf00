"""``pagedjax generate`` / ``python scripts/generate.py``: the main job. Streams the answer to one
prompt through the paged engine; defaults to the embedded SmolLM2-135M-Instruct."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import EngineArgs, add_engine_arguments
from .engine import LLMEngine
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    add_engine_arguments(parser)


def build_prompt(tokenizer, prompt: str, raw: bool, system: str | None) -> str | list[int]:
    if raw or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def run(args: argparse.Namespace) -> str:
    engine = LLMEngine(EngineArgs.from_namespace(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    engine.add_request("0", build_prompt(engine.tokenizer, args.prompt, args.raw, args.system), params)
    t0, first, text, n = time.perf_counter(), None, "", 0
    while engine.has_unfinished():
        for out in engine.step():
            piece = out.outputs[0].text[len(text):]
            text, n = out.outputs[0].text, len(out.outputs[0].token_ids)
            if piece:
                first = first or time.perf_counter()
                sys.stdout.write(piece)
                sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    logger.info("%d tokens in %.2f s (first token after %.2f s, %.1f tok/s after it)", n, dt,
                (first or t0) - t0, (n - 1) / max(dt - ((first or t0) - t0), 1e-9))
    return text

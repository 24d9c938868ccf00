"""``pagedjax generate`` / ``python scripts/generate.py``: the main job. Streams the answer to one
prompt through the paged engine; defaults to the embedded SmolLM2-135M-Instruct.

``--n`` samples several answers, ``--beam-width`` runs beam search (the beams with their scores),
``--logprobs K`` prints each token's logprob and the top K alternatives, ``--stop`` ends the answer
at a string. Every flag is checked by :func:`check` before JAX or the model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from pagedjax.config import add_engine_arguments
from pagedjax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# SamplingParams / BeamSearchParams field -> the flag that sets it, for error messages
FLAGS = {"n": "--n", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "min_p": "--min-p", "max_tokens": "--max-tokens", "logprobs": "--logprobs",
         "stop": "--stop", "seed": "--seed", "beam_width": "--beam-width"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=1,
                        help="answers to sample (each printed; use --temperature > 0)")
    parser.add_argument("--beam-width", type=int, default=None,
                        help="beam search with this many beams (printed with their scores)")
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="print each token's logprob and its top K alternatives")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the answer at this string (repeatable)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    add_engine_arguments(parser)


def _named(e: ValueError) -> ValueError:
    """A SamplingParams message ("top_p must be ...") with the flag's name instead."""
    msg = str(e)
    for field, flag in FLAGS.items():
        if msg.startswith(field + " "):
            return ValueError(flag + msg[len(field):])
    return e


def check(args: argparse.Namespace):
    """The request's parameters from the flags (SamplingParams, or BeamSearchParams with
    ``--beam-width``); a ValueError naming the flag if one is bad. No JAX, no model."""
    if args.beam_width is not None:
        from pagedjax.core.beam_search import BeamSearchParams

        clash = [flag for flag, bad in (
            ("--n", args.n != 1), ("--temperature", args.temperature != 0.0),
            ("--top-p", args.top_p != 1.0), ("--top-k", args.top_k not in (-1, 0)),
            ("--min-p", args.min_p != 0.0), ("--logprobs", args.logprobs is not None),
            ("--stop", bool(args.stop))) if bad]
        if clash:
            raise ValueError(f"--beam-width runs a deterministic beam search and cannot honour "
                             f"{', '.join(clash)}: drop {'it' if len(clash) == 1 else 'them'} "
                             "or --beam-width")
        try:
            return BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens)
        except ValueError as e:
            raise _named(e) from None
    if args.logprobs is not None:
        from pagedjax.worker.sampler import MAX_LOGPROBS

        if args.logprobs > MAX_LOGPROBS:
            raise ValueError(f"--logprobs {args.logprobs} exceeds the maximum {MAX_LOGPROBS}")
    try:
        return SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              seed=args.seed, logprobs=args.logprobs, stop=args.stop)
    except ValueError as e:
        raise _named(e) from None


def build_prompt(tokenizer, prompt: str, raw: bool, system: str | None) -> str | list[int]:
    if raw or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def format_logprobs(tokenizer, out) -> list[str]:
    """One line per generated token: the token, its logprob, then the top alternatives."""
    def show(tid: int) -> str:
        return repr(tokenizer.decode([tid])) if tokenizer is not None else str(tid)

    lines = []
    for tid, top in zip(out.token_ids, out.logprobs or []):
        alts = ", ".join(f"{show(t)} {lp:.3f}" for t, lp in
                         sorted(top.items(), key=lambda kv: -kv[1]) if t != tid)
        lines.append(f"  {show(tid):<16} {top[tid]:8.3f}" + (f"   top: {alts}" if alts else ""))
    return lines


def run(args: argparse.Namespace) -> str:
    params = check(args)  # again, for callers that skip the CLI
    from pagedjax.config import EngineArgs
    from pagedjax.engine import LLMEngine

    engine = LLMEngine(EngineArgs.from_namespace(args))
    prompt = build_prompt(engine.tokenizer, args.prompt, args.raw, args.system)
    beam = not isinstance(params, SamplingParams)
    if beam:
        engine.add_beam_request("0", prompt, params)
    else:
        engine.add_request("0", prompt, params)
    stream = not beam and params.n == 1
    want_logprobs = getattr(params, "logprobs", None) is not None
    t0, first, text, final = time.perf_counter(), None, "", None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
            if stream:
                piece = out.outputs[0].text[len(text):]
                text = out.outputs[0].text
                if piece:
                    first = first or time.perf_counter()
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    outs = final.outputs if final is not None else []
    if stream:
        sys.stdout.write("\n")
        if want_logprobs and outs:
            print("\n".join(["logprobs:", *format_logprobs(engine.tokenizer, outs[0])]))
    else:
        for i, o in enumerate(outs):
            head = (f"[beam {i + 1}/{len(outs)}] score {o.score:.4f}, logprob "
                    f"{o.cumulative_logprob:.4f}" if beam else f"[sample {i + 1}/{len(outs)}]")
            print(f"{head}\n{o.text}")
            if want_logprobs:
                print("\n".join(format_logprobs(engine.tokenizer, o)))
        text = outs[0].text if outs else ""
    n = sum(len(o.token_ids) for o in outs)
    dt = time.perf_counter() - t0
    logger.info("%d tokens in %.2f s (first token after %.2f s, %.1f tok/s after it)", n, dt,
                (first or t0) - t0, (n - 1) / max(dt - ((first or t0) - t0), 1e-9))
    return text

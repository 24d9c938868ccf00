"""Loader smoke run: ``python -m pagedjax.models.smoke [--model M] [--prompt P] [--tokens N]``.

Loads a model (default: the embedded SmolLM2-135M-Instruct) and prints its greedy continuation,
recomputing the whole sequence with ``forward_dense`` each step (no KV cache: this checks the
weights, not the engine). The sequence is right-padded to one fixed length so there is a single
compilation; causal attention keeps the padding from affecting earlier positions.
"""
from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from .decoder import forward_dense
from .loader import load_model


def greedy(loaded, prompt_ids: list[int], n: int) -> list[int]:
    cfg = loaded.cfg
    step = jax.jit(lambda p, t, i: jnp.argmax(forward_dense(p, cfg, t)[0, i]))
    tokens = np.zeros((1, len(prompt_ids) + n), np.int32)
    tokens[0, :len(prompt_ids)] = prompt_ids
    for i in range(len(prompt_ids), len(prompt_ids) + n):
        tokens[0, i] = int(step(loaded.params, tokens, i - 1))
    return tokens[0, len(prompt_ids):].tolist()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pagedjax").setLevel(logging.INFO)  # ours, not jax's backend chatter
    t0 = time.perf_counter()
    loaded = load_model(args.model, load_format=args.load_format)
    print(f"loaded {loaded.cfg.name or loaded.source} ({loaded.cfg.num_params() / 1e6:.0f}M "
          f"params, {loaded.dtype}) in {time.perf_counter() - t0:.1f} s on "
          f"{jax.devices()[0].platform}")
    tok = loaded.tokenizer
    if tok is None:
        raise SystemExit("this model has no tokenizer; the smoke run needs one")
    prompt_ids = tok(args.prompt)["input_ids"]
    t0 = time.perf_counter()
    new = greedy(loaded, prompt_ids, args.tokens)
    print(f"prompt: {args.prompt!r}")
    print(f"greedy next {len(new)} tokens: {new}")
    print(f"text: {tok.decode(new)!r}  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()

"""Device time of the sampler per step at the engine's row counts (Qwen2.5 vocabulary), and of
the Gumbel noise alone under each PRNG implementation: is random sampling a measurable part of a
decode step? ``python -m benchmarks.experiments.sampler_probe --out DIR`` (prints a table, writes JSON)."""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import print_table, results_dir, write_result
from pagedjax.worker import sampler


def _timed(fn, *args, n: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def _noise(impl: str, seeds, counters, vocab: int):
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s, impl=impl), c))(seeds, counters)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    return jnp.argmax(noise, axis=-1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.sampler_probe")
    p.add_argument("--out", default=None)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--rows", default="1,128,256,352")
    args = p.parse_args(argv)
    rows = []
    for s in (int(x) for x in args.rows.split(",")):
        rng = np.random.default_rng(s)
        logits = jnp.asarray(rng.standard_normal((s, args.vocab)), jnp.float32)
        temp = jnp.ones((s,), jnp.float32)
        top_p, min_p = jnp.ones((s,), jnp.float32), jnp.zeros((s,), jnp.float32)
        top_k, seeds = jnp.zeros((s,), jnp.int32), jnp.arange(s, dtype=jnp.int32)
        counters = jnp.zeros((s,), jnp.int32)
        row = {"rows": s}
        for name, kw in (("greedy", dict(random=False, filters=False, top=False)),
                         ("random", dict(random=True, filters=False, top=False)),
                         ("random_top_p", dict(random=True, filters=True, top=False))):
            fn = jax.jit(functools.partial(sampler.sample, **kw))
            row[f"{name}_ms"] = _timed(fn, logits, temp, top_p, top_k, min_p, seeds, counters)
        for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
            fn = jax.jit(functools.partial(_noise, impl, vocab=args.vocab))
            row[f"noise_{impl}_ms"] = _timed(fn, seeds, counters)
        print(row, flush=True)
        rows.append(row)
    print_table(rows, list(rows[0]))
    out = results_dir(args.out)
    write_result("sampler-probe", {"compilations_after_warmup": None}, {"rows": rows}, str(out))


if __name__ == "__main__":
    main()

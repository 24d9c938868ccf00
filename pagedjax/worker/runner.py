"""ModelRunner: turns a scheduled batch into ONE packed int32 host array, pads it to a bucket
shape, and calls ONE jitted step (pool donated) that writes K/V, attends, and samples on the
device. Only the sampled token ids and their logprobs come back to the host.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models import ModelConfig, StepMeta, forward_paged

from pagedjax.worker import kv_pool, penalties, sharding
from pagedjax.worker.attention import make_attend, resolve_backend
from pagedjax.core.batch import SAMPLING_FIELDS, SAMPLING_FLOATS, ScheduledBatch
from pagedjax.worker.sampler import prompt_logprobs, sample

logger = logging.getLogger(__name__)

# (name, rows of the bucket it scales with, float32 bit-cast?)
_INT, _F32 = False, True


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Static shape of one step: T token rows, S sequence rows, W block-table width;
    ``decode``: every sequence brings one token (the kernels then take the split-K decode path);
    ``Q``: token rows whose logits come back besides the S sampling rows, for prompt logprobs
    (only a step with a request that asks for them has Q > 0: those shapes are not precompiled).
    Copy-on-write block copies are not part of the step: they run in their own small program
    before it (``ModelRunner._copy``), so they add no step shapes."""

    T: int
    S: int
    W: int
    decode: bool = False
    Q: int = 0

    def fields(self):
        T, S, W = self.T, self.S, self.W
        return (("tokens", T, _INT), ("token_src", T, _INT), ("positions", T, _INT),
                ("slot_mapping", T, _INT),
                ("block_tables", S * W, _INT), ("context_lens", S, _INT),
                ("query_start_loc", S + 1, _INT), ("logits_indices", S + self.Q, _INT))

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, int, bool]]:
        out, at = {}, 0
        for name, n, is_float in self.fields():
            out[name] = (at, n, is_float)
            at += n
        return out

    @property
    def size(self) -> int:
        return sum(n for _, n, _ in self.fields())

    def unpack(self, packed: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for name, (at, n, is_float) in self.offsets.items():
            x = jax.lax.slice_in_dim(packed, at, at + n)
            out[name] = jax.lax.bitcast_convert_type(x, jnp.float32) if is_float else x
        out["block_tables"] = out["block_tables"].reshape(self.S, self.W)
        return out


class SampleMode(NamedTuple):
    """Static sampler flags of one step (pagedjax.worker.sampler.sample)."""

    random: bool = True  # some row has temperature > 0
    filters: bool = False  # some such row uses top-p / top-k / min-p
    top: bool = False  # some row wants its top logprobs


SAMPLE_MODES = tuple(SampleMode(r, f, t) for r in (False, True) for f in (False, True)
                     for t in (False, True) if r or not f)


class StepInputs(NamedTuple):
    """What ``prepare`` builds and ``execute`` sends: the model step's packed array and static
    layout, the sampler's per-row parameters and static flags, and the block copies to make
    before the step: one [2, C] array of source / destination blocks per copy program
    (destination -1 is padding). Only when some row asks: ``penalties`` (pagedjax.worker.penalties),
    and ``prompt_targets`` [Q], the prompt token each prompt-logprob row scores."""

    packed: np.ndarray
    layout: StepLayout
    sampling: np.ndarray
    mode: SampleMode
    copies: tuple[np.ndarray, ...] = ()
    penalties: np.ndarray | None = None
    prompt_targets: np.ndarray | None = None


class StepResult(NamedTuple):
    """Per sampling row: the sampled token, its logprob, the top MAX_LOGPROBS logprobs and ids;
    per prompt-logprob row (a step with Q > 0): the prompt token's logprob, the top ones."""

    tokens: jax.Array
    logprobs: jax.Array
    top_logprobs: jax.Array
    top_ids: jax.Array
    prompt_logprobs: jax.Array | None = None
    prompt_top_logprobs: jax.Array | None = None
    prompt_top_ids: jax.Array | None = None

    def wanted(self, with_top: bool) -> list[int]:
        return [i for i, x in enumerate(self) if x is not None and (with_top or i not in (2, 3))]

    def to_host(self, with_top: bool = True) -> "StepResult":
        """The one device wait of a step; the top logprobs travel only when a row wants them."""
        out = [None] * len(self)
        wanted = self.wanted(with_top)
        for i, x in zip(wanted, jax.device_get([self[i] for i in wanted])):
            out[i] = x
        return StepResult(*out)


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(n - 1, 0).bit_length())


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, spec: kv_pool.KVPoolSpec, *, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, attention_backend: str = "auto",
                 interpret: bool = False, mesh=None, sink_tokens: int = 0, window: int = 0):
        self.cfg = cfg
        self.mesh = mesh  # tensor parallelism (pagedjax.worker.sharding); None on one device
        params = kv_pool.params_for_pool(spec, cfg, params)  # fp8: static KV scales
        self.params = params if mesh is None else sharding.place_params(cfg, params, mesh)
        self.spec = spec
        self.block_size = spec.block_size
        self.max_blocks = spec.blocks_for(max_model_len)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # The largest copy program: copy-on-write copies at most one block per sequence a step
        # (only the block a sequence's first new token lands in can be shared). More copies (a
        # fork that copies whole tables: benchmarks/beam.py) run as several programs of this
        # size, so every copy program is precompiled and none needs a pool-sized scratch.
        self.max_copies = _pow2_at_least(max_num_seqs, 4)
        pool_sharding = None if mesh is None else sharding.pool_sharding(mesh)
        # Committed from the start: a step's outputs are committed once any input is, and jit
        # keys its cache on committedness, so an uncommitted first pool (or first ``_sampled``)
        # would compile the first step shape twice (pagedjax.worker.faults.fresh_pool keeps it so).
        self.pool = _committed(kv_pool.allocate(spec, sharding=pool_sharding))
        # The Pallas kernels loop over each sequence's real context, so a wider block table costs
        # nothing there: fix W at the maximum and give mixed steps S = min(max seqs, T). That
        # leaves ~16 step shapes to compile instead of hundreds. The reference attention's cost
        # grows with W and S, so on it both stay bucketed.
        self.coarse_buckets = resolve_backend(attention_backend) != "reference"
        attend = make_attend(attention_backend, interpret=interpret, mesh=mesh,
                             sink_tokens=sink_tokens, window=window)
        # Under tp the results come back replicated (every process reads them) and the pool
        # keeps its KV-head sharding from step to step.
        out = {} if mesh is None else {"out_shardings": (
            (sharding.replicated(mesh), pool_sharding))}
        # host arrays in: a copy (the host may reuse its buffers), uncommitted on one device as
        # jit expects; jnp.asarray would compile a staging program for every new shape
        self._to_device = (functools.partial(jax.device_put, may_alias=False) if mesh is None
                           else functools.partial(jax.device_put,
                                                  device=sharding.replicated(mesh)))
        self._step = jax.jit(functools.partial(_step, cfg=cfg, attend=attend),
                             static_argnames=("layout",), donate_argnames=("pool",), **out)
        # Copy-on-write copies: their own program per copy bucket C, dispatched before the step
        # that needs them, so they do not multiply the step shapes.
        # (A partial: jax.jit of one function object shares its compiled cache between jits, so
        # this runner's num_compilations would count another runner's copy programs.)
        self._copy = jax.jit(functools.partial(_copy_step), donate_argnums=0,
                             **({} if mesh is None else {"out_shardings": pool_sharding}))
        # The last step's sampled tokens, on the device, padded to every bucket's S: the next
        # step reads the tokens it was dispatched without (async scheduling) from here.
        self.max_rows = _pow2_at_least(max(max_num_seqs, 4), 4)
        sample_out = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
        self._sample = jax.jit(functools.partial(_sample_step, max_rows=self.max_rows),
                               static_argnames=("mode",), **sample_out)
        self.reset_sampled()

    def reset_sampled(self) -> None:
        """A zero sampled-token buffer: at start, and after a failed step poisoned the last one
        (pagedjax.worker.faults: the next step reads it, and would fail with the old step's
        error)."""
        self._sampled = _committed(self._to_device(np.zeros(self.max_rows, np.int32)))

    # ---- buckets -----------------------------------------------------------------------------
    def layout_for(self, num_tokens: int, num_seqs: int, max_blocks: int,
                   decode: bool = False) -> StepLayout:
        """The bucket of a step with ``num_tokens`` token rows and ``num_seqs`` sampling rows
        (its sequences plus the n > 1 children it forks). T covers the rows too (a fork-heavy
        step pads tokens rather than adding an S of its own), so under coarse buckets every
        step's shape is fixed by one number: T for a mixed step, its rows for a decode step."""
        t_cap = max(self.max_num_batched_tokens, 16)
        T = max(min(_pow2_at_least(max(num_tokens, num_seqs), 16), t_cap), num_tokens)
        s_cap = max(self.max_num_seqs, 4)
        S = min(_pow2_at_least(num_seqs, 4), s_cap)
        W = min(_pow2_at_least(max_blocks, 4), self.max_blocks)
        if self.coarse_buckets:
            W = self.max_blocks
            if not decode:
                S = max(S, min(_pow2_at_least(T, 4), s_cap))
        return StepLayout(T, S, max(W, 1), decode)

    def copy_bucket(self, num_copies: int) -> int:
        return min(_pow2_at_least(num_copies, 4), self.max_copies)

    def _reachable(self):
        """(num_tokens, num_seqs, decode) triples the scheduler can produce, one per region in
        which ``layout_for`` is constant (its breakpoints: powers of two and the caps), so that
        their layouts are every layout a real step can get. A decode step has as many tokens as
        sequences and at most max(1, budget) of them; a mixed step has 2..budget tokens; either
        may sample up to max_num_seqs rows (forks)."""
        budget, seqs = max(self.max_num_batched_tokens, 1), self.max_num_seqs
        caps = (4, 16, budget, seqs, max(budget, 16), max(seqs, 4))

        def points(lo, hi):
            out, p = {lo, hi}, 1
            while p <= hi:
                out |= {p - 1, p, p + 1}
                p *= 2
            out |= {c + d for c in caps for d in (-1, 0, 1)}
            return sorted(x for x in out if lo <= x <= hi)

        for n in points(1, min(budget, seqs)):
            for rows in points(n, seqs):
                yield n, rows, True
        for n in points(2, budget):
            for rows in points(1, seqs):
                yield n, rows, False

    def buckets(self, max_context: int | None = None) -> list[StepLayout]:
        """Every step shape the engine can produce for contexts up to max_context (under coarse
        buckets W is fixed, so max_context changes nothing there): mixed steps first, each
        sorted by (T, S, W)."""
        max_blocks = self.max_blocks if max_context is None else self.spec.blocks_for(max_context)
        ws = sorted({self.layout_for(1, 1, w).W for w in _doublings(1, max_blocks)})
        out = set()
        for n, rows, decode in self._reachable():
            base = self.layout_for(n, rows, 1, decode)
            out |= {dataclasses.replace(base, W=w) for w in ws}
        return sorted(out, key=lambda x: (x.decode, x.T, x.S, x.W))

    def copy_buckets(self) -> list[int]:
        """Every copy-program size C: 4, 8, ... up to ``max_copies`` (a power of two)."""
        return _doublings(4, self.max_copies)

    def warmup(self, max_context: int | None = None, workers: int | None = None
               ) -> dict[str, float]:
        """Compile every program a step can run, before the first request: each bucket (an
        all-padding step writes nothing), the sampler in every mode for every S, and the copy
        program for every copy bucket, with arguments made as ``execute`` makes them.

        Steps compile one at a time on this thread: their GEMM autotuning shares the device's
        free memory (concurrent ones ran out of it). Meanwhile ``workers`` threads (default
        min(8, CPUs); XLA compiles without the GIL) compile the sampler and copy programs ahead
        of time, from shapes only: the sampler's from the first step of its S (logits sharded
        and committed as a real step's), the copies' from the pool's. Nothing runs there, so
        they need no device memory beyond the compiler's and their order against the steps'
        does not matter. Each then runs once here, after the steps, from the executable
        compiled for it (a jit call finds it), which enters it in jit's dispatch cache.

        Logs what it compiled; returns seconds by kind: "steps", their time on this thread
        (tracing, compiling or loading from the persistent cache, one run); "sampler" and
        "copies", wall seconds from their first submission to their last compile's end
        (overlapping the steps), plus their runs afterwards."""
        c0, t0 = self.num_compilations, time.perf_counter()
        layouts = self.buckets(max_context)
        workers = workers or min(8, os.cpu_count() or 1)
        seconds, slowest = {"steps": 0.0, "sampler": 0.0, "copies": 0.0}, (0.0, None)
        copies = [self._to_device(np.stack([np.zeros(C, np.int32), np.full(C, -1, np.int32)]))
                  for C in self.copy_buckets()]  # destination -1: a run writes nothing
        samplers = {}  # S: (logits' shape, sampling parameters)
        jobs, first = {"sampler": [], "copies": []}, {"copies": time.perf_counter()}
        executor = ThreadPoolExecutor(workers, thread_name_prefix="pagedjax-warmup")
        try:
            pool = jax.tree.map(_shape_of, self.pool)
            jobs["copies"] = [executor.submit(_compiled_at, self._copy, pool, c) for c in copies]
            for layout in layouts:
                packed = np.zeros(layout.size, dtype=np.int32)
                for field in ("slot_mapping", "token_src"):
                    at, n, _ = layout.offsets[field]
                    packed[at:at + n] = -1
                t = time.perf_counter()
                logits, self.pool = self._step(self.params, self.pool, self._sampled,
                                               self._to_device(packed), layout=layout)
                jax.block_until_ready(logits)
                took = time.perf_counter() - t
                seconds["steps"] += took
                slowest = max(slowest, (took, layout), key=lambda x: x[0])
                if layout.S not in samplers:
                    first.setdefault("sampler", time.perf_counter())
                    samplers[layout.S] = s = (_shape_of(logits), self._to_device(
                        np.zeros((len(SAMPLING_FIELDS), layout.S), np.int32)))
                    jobs["sampler"] += [executor.submit(_compiled_at, self._sample, *s, mode=mode)
                                        for mode in SAMPLE_MODES]
            for kind, futures in jobs.items():
                seconds[kind] = max(f.result() for f in futures) - first[kind]
        finally:
            executor.shutdown(cancel_futures=True)  # after a failure: start nothing more
        t = time.perf_counter()
        for shape, sampling in samplers.values():
            logits = jnp.zeros(shape.shape, shape.dtype, device=shape.sharding)
            for mode in SAMPLE_MODES:
                jax.block_until_ready(self._sample(logits, sampling, mode=mode))
        seconds["sampler"] += time.perf_counter() - t
        t = time.perf_counter()
        for c in copies:
            self.pool = self._copy(self.pool, c)
        jax.block_until_ready(self.pool)
        seconds["copies"] += time.perf_counter() - t
        logger.info("Warm-up in %.1f s (contexts up to %d tokens; %d programs compiled): %d step "
                    "shapes in %.1f s (slowest %s: %.1f s); alongside them on %d threads, %d "
                    "sampler variants in %.1f s and %d copy programs in %.1f s",
                    time.perf_counter() - t0, (max_context or self.max_blocks * self.block_size),
                    self.num_compilations - c0, len(layouts), seconds["steps"], slowest[1],
                    slowest[0], workers, len(jobs["sampler"]), seconds["sampler"], len(copies),
                    seconds["copies"])
        return seconds

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far: model step shapes, sampler (S, mode) variants and copy
        programs."""
        return (self._step._cache_size() + self._sample._cache_size()
                + self._copy._cache_size())

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The batch's arrays (pagedjax.core.batch.BatchArrays) padded into the bucket's packed
        layout: rows past the batch's are padding (slot -1 writes nothing, top_p 1)."""
        a = batch.arrays
        R, rows, n_tok = len(a.context_lens), a.sampling.shape[1], len(a.tokens)
        layout = self.layout_for(n_tok, rows, a.block_tables.shape[1], decode=n_tok == R)
        if len(a.prompt_index):
            layout = dataclasses.replace(
                layout, Q=min(_pow2_at_least(len(a.prompt_index), 16), layout.T))
        packed = np.zeros(layout.size, dtype=np.int32)
        view = {name: packed[at:at + n] for name, (at, n, _) in layout.offsets.items()}
        for name in ("tokens", "token_src", "positions", "slot_mapping"):
            view[name][:n_tok] = getattr(a, name)
        view["token_src"][n_tok:] = view["slot_mapping"][n_tok:] = -1
        view["block_tables"].reshape(layout.S, layout.W)[:R, :a.block_tables.shape[1]] = \
            a.block_tables
        view["context_lens"][:R] = a.context_lens
        view["query_start_loc"][:R + 1] = a.query_start_loc
        view["query_start_loc"][R + 1:] = n_tok
        view["logits_indices"][:rows] = a.logits_indices
        view["logits_indices"][layout.S:layout.S + len(a.prompt_index)] = a.prompt_index
        sampling = np.zeros((len(SAMPLING_FIELDS), layout.S), np.int32)
        sampling[:, :rows] = a.sampling
        sampling[SAMPLING_FIELDS.index("top_p"), rows:] = np.float32(1.0).view(np.int32)
        f = dict(zip(SAMPLING_FIELDS, a.sampling))
        temperature, top_p, min_p = (f[k].view(np.float32) for k in ("temperature", "top_p",
                                                                     "min_p"))
        randoms = temperature > 0
        mode = SampleMode(random=bool(randoms.any()),
                          filters=bool((randoms & ((top_p < 1) | (f["top_k"] > 0) | (min_p > 0)))
                                       .any()),
                          top=bool((f["num_top"] > 0).any()))
        copies = []  # [2, C] (source, destination) per copy program; destination -1 is padding
        for at in range(0, len(batch.copies), self.max_copies):
            part = np.asarray(batch.copies[at:at + self.max_copies], np.int32).T
            c = np.zeros((2, self.copy_bucket(part.shape[1])), np.int32)
            c[1] = -1
            c[:, :part.shape[1]] = part
            copies.append(c)
        targets = None
        if len(a.prompt_index):
            targets = np.zeros(layout.Q, np.int32)
            targets[:len(a.prompt_targets)] = a.prompt_targets
        return StepInputs(packed, layout, sampling, mode, tuple(copies),
                          penalties.pack(a.penalized, layout.S) if a.penalized else None, targets)

    def execute(self, inputs: StepInputs) -> "StepResult":
        """Dispatch the model step and its sampler; the results stay on the device until the
        host reads them. Nothing here waits for the device."""
        for copies in inputs.copies:  # copy-on-write, before the step writes into the copies
            self.pool = self._copy(self.pool, self._to_device(copies))
        logits, self.pool = self._step(self.params, self.pool, self._sampled,
                                       self._to_device(inputs.packed), layout=inputs.layout)
        extra = {}  # only for a step with a row that asks: other steps run the precompiled ones
        if inputs.penalties is not None:
            extra.update(marks=self._to_device(inputs.penalties), prev=self._sampled)
        if inputs.prompt_targets is not None:
            extra["prompt_targets"] = self._to_device(inputs.prompt_targets)
        *out, self._sampled = self._sample(logits, self._to_device(inputs.sampling),
                                           mode=inputs.mode, **extra)
        result = StepResult(*out)
        # Queue the copies to the host now, behind this step: queued later, at to_host(), they
        # would wait behind the next step, already dispatched (async scheduling).
        for i in result.wanted(inputs.mode.top):
            result[i].copy_to_host_async()
        return result


def _step(params, pool, sampled, packed, *, layout: StepLayout, cfg: ModelConfig, attend):
    f = layout.unpack(packed)
    src = f["token_src"]  # >= 0: the token is row src of the previous step's samples
    tokens = jnp.where(src >= 0, sampled[jnp.clip(src, 0, sampled.shape[0] - 1)], f["tokens"])
    meta = StepMeta(f["slot_mapping"], f["block_tables"], f["context_lens"],
                    f["query_start_loc"], decode_only=layout.decode)
    return forward_paged(params, cfg, tokens, f["positions"], pool, meta, attend,
                         f["logits_indices"])


def _doublings(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi."""
    out = []
    while lo < hi:
        out.append(lo)
        lo *= 2
    return out + [hi]


def _copy_step(pool, copies):
    """Copy blocks copies[0, i] -> copies[1, i] in every layer; destination -1 copies nothing."""
    return kv_pool.copy_blocks(pool, copies[0], copies[1])


def _shape_of(x: jax.Array) -> jax.ShapeDtypeStruct:
    """What a jit call keys its program on: shape, dtype and sharding (and, being given one,
    committed)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _compiled_at(jitted, *args, **static) -> float:
    """Compile ``jitted`` for these arguments ahead of time (a warm-up job); returns when done."""
    jitted.lower(*args, **static).compile()
    return time.perf_counter()


def _committed(tree):
    """``tree``'s arrays committed to the devices they are on (jax.device_put of an uncommitted
    array to its own sharding)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def _sample_step(logits, sampling, marks=None, prev=None, prompt_targets=None, *,
                 mode: SampleMode, max_rows: int):
    """Sample the step's rows (the first S rows of ``logits``; the Q after them are prompt
    positions, scored against ``prompt_targets``); also returns the tokens padded to
    ``max_rows`` (the next step's ``sampled`` input)."""
    p = dict(zip(SAMPLING_FIELDS, sampling))
    for name in SAMPLING_FLOATS:
        p[name] = jax.lax.bitcast_convert_type(p[name], jnp.float32)
    S = sampling.shape[1]
    prompt = ()
    if prompt_targets is not None:
        prompt = prompt_logprobs(logits[S:], prompt_targets)
        logits = logits[:S]
    adjusted = None if marks is None else penalties.apply(logits, marks, prev)
    result = sample(logits, p["temperature"], p["top_p"], p["top_k"], p["min_p"], p["seeds"],
                    p["counters"], random=mode.random, filters=mode.filters, top=mode.top,
                    adjusted=adjusted)
    padded = jnp.zeros((max_rows,), jnp.int32).at[:S].set(result[0])
    return (*result, *prompt, padded)

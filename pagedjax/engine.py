"""LLMEngine: requests in, outputs out, one ``step()`` at a time (schedule -> run -> postprocess)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import NamedTuple

import jax
import numpy as np

from pagedjax.worker import compile_cache, device_memory, faults, kv_pool, sharding, swap
from pagedjax.core.batch import ScheduledBatch
from pagedjax.core.beam_search import BeamSearchParams, BeamState
from pagedjax.core.block_manager import BlockManager
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.core.detokenizer import IncrementalDetokenizer
from pagedjax.core.host_cache import HostPrefixCache
from pagedjax.core.prefix_cache import PrefixCachingBlockManager
from pagedjax.planning.memory_report import format_memory_report, memory_report
from pagedjax.outputs import RequestMetrics, RequestOutput
from pagedjax.core.request import BeamGroup, Request
from pagedjax.worker.runner import ModelRunner, StepResult
from pagedjax.worker.sampler import MAX_LOGPROBS
from pagedjax.sampling_params import SamplingParams
from pagedjax.core.scheduler import Scheduler
from pagedjax.core.sequence import Sequence
from pagedjax.stats import EngineSnapshot, EngineStats

logger = logging.getLogger(__name__)


class InFlight(NamedTuple):
    """A dispatched step: its batch and its results, still on the device."""

    batch: ScheduledBatch
    result: StepResult
    want_top: bool  # some row wants its top logprobs (the sampler computed them): fetch them


class LLMEngine:
    def __init__(self, args: EngineArgs, loaded=None, *, block_manager_cls=None, execute=None):
        """``block_manager_cls`` (benchmarks): a BlockManager subclass to build the block manager
        from, e.g. one that copies forked blocks instead of sharing them (benchmarks/beam.py).

        ``execute`` (the fake-device seam, for benchmarks and tests without a model): called with
        each step's ``StepInputs`` instead of ``ModelRunner.execute``; returns what the device
        would (a ``StepResult``-shaped object with ``to_host``), so the host side runs as it
        does for real (benchmarks/host_overhead.py, tests/reliability/fake_device.py)."""
        self.args = args
        # seconds of each start-up phase, in order (logged once built; a server's /metrics)
        self.startup_s: dict[str, float] = {}
        lap = _Lap(self.startup_s)
        device_memory.configure_allocator(args.gpu_memory_utilization)  # before JAX starts
        self.compilation_cache = compile_cache.setup(args.compilation_cache,
                                                     args.compilation_cache_dir)
        owned = loaded is None  # the engine loads the weights itself: it may consume them
        if owned:  # (a model handed in has brought the backend up already)
            _bring_up_device()
            lap("device init")
            from pagedjax.models.loader import load_model

            loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype,
                                tokenizer=args.tokenizer, seed=args.seed,
                                quantization=args.quantization)
            lap("load")
        params, quantization = loaded.params, getattr(loaded, "quantization", None)
        if args.quantization and not quantization and params is not None:
            from pagedjax.models.fp8 import quantize_params

            params, quantization = quantize_params(params), args.quantization  # a copy
        self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
        self.config = config = EngineConfig.resolve(args, loaded.cfg, loaded.dtype, quantization)
        self.max_model_len = config.max_model_len
        cfg = self.cfg
        # q/k/v and gate/up fused; tp > 1: params sharded (KV heads replicated when tp > K)
        # before memory is measured
        self.tp = sharding.TensorParallel.build(cfg, params, config.tp, consume=owned)
        lap("prepare weights")
        has_weights = params is not None
        del loaded, params  # an owned model's originals go now, before the pool is sized
        self.spec = self._size_pool()
        kv_pool.check_fits(self.spec, self.max_model_len, config.max_num_batched_tokens)
        kv_pool.log_capacity(self.spec, self.max_model_len)
        lap("size pool")
        # the host tier: swapped sequences and the prefix cache's host copies share one pool
        self.swap_space = swap.make_swap_space(args, self.spec, self.max_model_len)
        self.host_cache = (HostPrefixCache(self.swap_space) if args.kv_offloading_size else None)
        lap("host memory")
        bm_cls = block_manager_cls or (PrefixCachingBlockManager if args.enable_prefix_caching
                                       else BlockManager)
        self.block_manager = bm_cls(self.spec.num_blocks, args.block_size,
                                    **({"salt": hash(cfg), "host": self.host_cache}
                                       if args.enable_prefix_caching else {}))
        self.block_manager.set_window(config.sink_tokens, config.window)
        interpret = jax.devices()[0].platform == "cpu"
        with faults.explain_oom_at_start("allocating the KV pool", self.spec, self.max_model_len):
            self.runner = ModelRunner(self.tp.cfg, self.tp.params, self.spec,
                                      max_model_len=self.max_model_len,
                                      max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=config.max_num_batched_tokens,
                                      attention_backend=args.attention_backend,
                                      interpret=interpret, mesh=self.tp.mesh,
                                      sink_tokens=config.sink_tokens, window=config.window)
            self.host_pool = (swap.HostKVPool(self.spec, self.swap_space, self.runner)
                              if self.swap_space is not None else None)
        lap("allocate pool")
        if self.host_cache is not None:
            s = self.swap_space
            blocks = s.num_pieces * s.piece_blocks
            logger.info("KV offloading: host tier of %d blocks x %d tokens = %d tokens (%.2f GiB, "
                        "pieces of %d blocks), shared with the swap space: a swapped-out "
                        "sequence takes the room of cached blocks", blocks, args.block_size,
                        blocks * args.block_size, blocks * self.spec.bytes_per_block / kv_pool.GiB,
                        s.piece_blocks)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.stats = EngineStats()
        self._fake_execute = execute
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs,
                                   config.max_num_batched_tokens, args.enable_chunked_prefill,
                                   swap_space=(self.swap_space if args.preemption_mode == "swap"
                                               else None),
                                   max_model_len=self.max_model_len,
                                   eos_token_ids=self.eos_token_ids, vocab_size=cfg.vocab_size,
                                   decode=self._decode, stats=self.stats)
        self._on_device: list[InFlight] = []  # dispatched, not yet completed (at most 2)
        self._dispatching: ScheduledBatch | None = None  # scheduled, on its way to the device
        self.fault: str | None = None  # a failed step's error until its reset succeeded (faults.py)
        # called with the engine after each step: a seam for observers such as the benchmarks'
        # step timeline (benchmarks/harness.py), which must not wrap engine methods
        self.step_observers: list = []
        self.last_batch: ScheduledBatch | None = None  # the latest step's, for observers
        self._arrivals = itertools.count()
        self._seed_rng = np.random.default_rng(args.seed)
        # Engine-level precompilation: every program a step can run, before the first request.
        # Without weights (a stand-in device: benchmarks.host_overhead) there is nothing to run.
        self.precompile = (args.precompile if args.precompile is not None else
                           self.runner.coarse_buckets and not interpret
                           and has_weights)
        self.precompile_s, self.precompile_compilations = 0.0, 0
        self.precompile_parts: dict[str, float] = {}  # seconds by kind of program (runner.warmup)
        if self.precompile:
            self._precompile()
            lap("precompile")
        logger.info("Start-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_s.items()))

    def _precompile(self) -> None:
        r = self.runner
        c0, t0 = r.num_compilations, time.perf_counter()
        (hits0, misses0) = compile_cache.counts()
        with faults.explain_oom_at_start("precompiling the step", self.spec, self.max_model_len):
            self.precompile_parts = r.warmup()  # logs what it compiled
        self.precompile_s = time.perf_counter() - t0
        self.precompile_compilations = r.num_compilations - c0
        if self.compilation_cache is not None:
            hits, misses = compile_cache.counts()
            logger.info("Compilation cache %s: %d programs loaded, %d compiled and stored, in "
                        "%.1f s", self.compilation_cache, hits - hits0, misses - misses0,
                        self.precompile_s)

    def _size_pool(self) -> kv_pool.KVPoolSpec:
        """The planner's arithmetic (pagedjax.planning.memory_report), fed with this device's
        numbers."""
        dev = jax.local_devices()[0]  # multi-host: devices()[0] may be another process's
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        self.memory = memory_report(self.config, total_bytes=device_memory.device_bytes(dev),
                                    weights=stats["bytes_in_use"] if stats else None)
        logger.info(format_memory_report(self.memory))
        return kv_pool.KVPoolSpec.for_model(self.tp.cfg, self.memory["num_blocks"],
                                            self.config.block_size, self.config.kv_dtype,
                                            self.config.sink_tokens, self.config.window)

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights?): pass prompt_token_ids")
        return list(self.tokenizer.encode(prompt))

    @property
    def requests(self) -> dict[str, Request]:
        """Live requests by id (the scheduler's)."""
        return self.scheduler.requests

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = True) -> None:
        """Validate and queue a request; a bad request raises ValueError and changes nothing."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.check_request(prompt, params)
        text = prompt if isinstance(prompt, str) else None
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1))
        arrival = next(self._arrivals)
        # filled as the prompt is computed, whichever sample computes it
        prompt_lps = [None] * len(ids) if params.prompt_logprobs is not None else None
        # sample i draws with seed + i: the same tokens as a lone request with that seed
        seqs = [Sequence(request_id, ids, params, arrival, seed=(seed + i) % (2**31 - 1), index=i,
                         prompt_logprobs=prompt_lps)
                for i in range(params.best_of)]
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        self.scheduler.add(Request(request_id, text, ids, params, seqs, detoks,
                                   RequestMetrics(arrival_time or time.time()),
                                   max_tokens=max_tokens, stream=stream, unforked=seqs[1:]))
        self.stats.prompt_tokens += len(ids)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Every check ``add_request`` makes of a prompt and its parameters, without queueing
        anything (``LLM.generate`` checks a whole batch before adding any); returns the ids."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, not "
                             f"{type(params).__name__}")
        if params.best_of > self.args.max_num_seqs:
            raise ValueError(f"best_of/n = {params.best_of} exceeds --max-num-seqs "
                             f"{self.args.max_num_seqs}: lower n or raise --max-num-seqs")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > MAX_LOGPROBS:
                raise ValueError(f"{name} = {getattr(params, name)} exceeds the maximum "
                                 f"{MAX_LOGPROBS}")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate_prompt(ids)
        self._check_pool_room(params.best_of, len(ids), params.max_tokens)
        return ids

    def add_beam_request(self, request_id: str, prompt: str | list[int],
                         params: BeamSearchParams) -> None:
        """Queue a beam search; its beams share KV blocks and fork inside the engine step."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if 2 * params.beam_width > MAX_LOGPROBS:
            raise ValueError(f"beam_width {params.beam_width} needs {2 * params.beam_width} "
                             f"candidates per beam; the step returns {MAX_LOGPROBS}")
        if params.beam_width > self.args.max_num_seqs:
            raise ValueError(f"beam_width {params.beam_width} exceeds --max-num-seqs "
                             f"{self.args.max_num_seqs}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if text is not None else [int(t) for t in prompt]
        self.validate_prompt(ids)
        self._check_pool_room(params.beam_width, len(ids), params.max_tokens)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        params = dataclasses.replace(params, max_tokens=max_tokens)
        # logprobs: the step returns each beam's top 2 x width candidates
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=2 * params.beam_width)
        seq = Sequence(request_id, ids, sp, next(self._arrivals), seed=0)
        self.scheduler.add(BeamGroup(request_id, text, ids, sp, [seq], [],
                                     RequestMetrics(time.time()), max_tokens=max_tokens,
                                     stream=False, beam=BeamState(params, self.eos_token_ids)))
        self.stats.prompt_tokens += len(ids)

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}, "
                "which leaves no room for a new token: shorten the prompt or raise --max-model-len")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")

    def _check_pool_room(self, num_seqs: int, prompt_len: int, max_tokens: int | None) -> None:
        """Refuse a request whose sequences could not all hold their KV at once: they would
        preempt one another forever (a recomputed sample shares no blocks with its siblings)."""
        longest = min(prompt_len + (max_tokens or self.max_model_len), self.max_model_len)
        need = num_seqs * self.spec.seq_blocks(longest, self.config.max_num_batched_tokens)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"{num_seqs} sequences of up to {longest} tokens may need {need} KV blocks at "
                f"once and the pool holds {self.block_manager.num_blocks}: lower n / best_of / "
                "the beam width or max_tokens, or give the KV cache more memory")

    def abort(self, request_id: str) -> None:
        self.end_request(request_id, "abort")

    def end_request(self, request_id: str, reason: str) -> Request | None:
        """Finish every live sequence of a request with ``reason`` and forget the request."""
        return self.scheduler.end_request(request_id, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._on_device)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch the next step, then wait for the previous one and return its
        outputs. With async scheduling the two overlap: the next step is prepared and queued
        while the device still runs the last one, reading the tokens it does not know yet from
        the device (PLACEHOLDERs). A step whose results decide what runs next (a beam round, a
        fork of n > 1 samples) is waited for before anything else is scheduled."""
        t0 = time.perf_counter()
        wait0 = self.stats.device_seconds
        outputs: list[RequestOutput] = []
        try:
            batch = self.last_batch = self.scheduler.schedule()
            t1 = time.perf_counter()
            self.stats.schedule_seconds += t1 - t0
            if batch:  # a failed transfer fails it too: its PLACEHOLDERs are set
                self._dispatching = batch
            # before the step writes into the freed blocks
            if batch.swap_out or batch.swap_in or batch.offload_out or batch.offload_in:
                before = self._on_device[-1].result.tokens if self._on_device else None
                self.stats.device_seconds += self.host_pool.execute(batch, self.runner, before)
            if batch:
                t1 = time.perf_counter()
                inputs = self.runner.prepare(batch)
                self.stats.prepare_seconds += time.perf_counter() - t1
                execute = self._fake_execute or self.runner.execute
                self._on_device.append(InFlight(batch, execute(inputs), inputs.mode.top))
                self._dispatching = None
            while len(self._on_device) > 1 or (self._on_device and (
                    not batch or self._on_device[0].batch.needs_host
                    or not self.args.async_scheduling)):
                outputs += self._complete_oldest()
        except Exception as e:  # only the failed steps' requests fail; the KV pool is rebuilt
            failed = [f.batch for f in self._on_device] + [b for b in [self._dispatching] if b]
            self._on_device, self._dispatching = [], None
            return outputs + self._fail(failed, e)
        self.stats.host_seconds += time.perf_counter() - t0 - (self.stats.device_seconds - wait0)
        for observe in self.step_observers:
            observe(self)
        return outputs

    def _complete_oldest(self) -> list[RequestOutput]:
        """Wait for the oldest dispatched step's samples and hand them to the scheduler."""
        f = self._on_device[0]
        t = time.perf_counter()
        result = f.result.to_host(f.want_top)  # the one device wait
        self.stats.device_seconds += time.perf_counter() - t
        self.stats.steps += 1
        t = time.perf_counter()
        outputs = self.scheduler.update_from_output(f.batch, result)
        self.stats.update_seconds += time.perf_counter() - t
        self._on_device.pop(0)
        return outputs

    def _fail(self, batches: list[ScheduledBatch], error: Exception) -> list[RequestOutput]:
        """A device step raised ``error`` while ``batches`` were on the device (with async
        scheduling, the one running and the one queued behind it): their requests fail, every
        other sequence is recomputed into a fresh pool. ``self.fault`` names the error until the
        reset succeeded (the server's /health answers 503 meanwhile)."""
        self.fault = faults.describe(error)
        logger.error("%s; failing the step's requests, recomputing the rest", self.fault,
                     exc_info=error)
        outputs = self.scheduler.fail(batches, self.fault)
        faults.reset_device(self.runner)
        self.fault = None
        return outputs

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return (self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
                if self.tokenizer else "")

    # ---- introspection -----------------------------------------------------------------------
    def make_stats(self) -> EngineSnapshot:
        """Every counter and gauge of the engine's parts, in one snapshot (pagedjax.stats)."""
        sched, bm = self.scheduler, self.block_manager
        moved = self.host_pool.landed if self.host_pool is not None else swap.SwapStats()
        host = self.host_cache
        return EngineSnapshot(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_swapped=len(sched.swapped), kv_cache_usage=bm.usage,
            cpu_cache_usage=self.swap_space.usage if self.swap_space is not None else 0.0,
            **dataclasses.asdict(self.stats), num_preemptions=sched.num_preemptions,
            num_preemptions_swap=sched.num_preemptions_swap,
            num_preemptions_recompute=sched.num_preemptions_recompute,
            prefix_cache_queries=bm.queries, prefix_cache_hits=bm.hits,
            num_compilations=self.runner.num_compilations,
            swap_out_blocks=moved.blocks["out"], swap_in_blocks=moved.blocks["in"],
            kv_offload_usage=host.usage if host is not None else 0.0,
            kv_offload_blocks=host.num_blocks if host is not None else 0,
            kv_offload_queries=host.queries if host is not None else 0,
            kv_offload_hits=host.hits if host is not None else 0,
            **{f"kv_offload_{d}_{what}": getattr(moved, what)[d] for d in ("store", "load")
               for what in ("blocks", "payload_bytes", "seconds")})


def _bring_up_device() -> None:
    """JAX's backend up: the device client (on a GPU: its context and the allocator's pool) and
    the compiler, with one tiny program; timed on its own, not inside the first phase that
    touches the device."""
    jax.devices()
    jax.block_until_ready(jax.numpy.zeros(()) + 1)


class _Lap:
    """Records the seconds since the previous call under each phase's name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.into[phase] = now - self.t
        self.t = now

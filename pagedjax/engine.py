"""LLMEngine: requests in, outputs out, one ``step()`` at a time (schedule -> run -> postprocess)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax
import numpy as np

from . import device_memory, faults, kv_pool, sharding, swap
from .beam_search import BeamSearchParams, BeamState
from .block_manager import BlockManager
from .config import EngineArgs, EngineConfig
from .detokenizer import IncrementalDetokenizer
from .prefix_cache import PrefixCachingBlockManager
from .memory_report import format_memory_report, memory_report
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .runner import ModelRunner, StepResult
from .sampler import MAX_LOGPROBS
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import PLACEHOLDER, Sequence
from .stats import EngineSnapshot

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    max_tokens: int  # params.max_tokens capped by what max_model_len leaves after the prompt
    stream: bool = True  # False: an output only when the request finishes
    beam: BeamState | None = None
    beam_candidates: dict[int, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(s.finished for s in self.seqs)


@dataclasses.dataclass
class InFlight:
    """A dispatched step: its batch, its device results, and per sequence row that samples the
    index of its PLACEHOLDER in ``output_token_ids`` (None for a beam row)."""

    batch: ScheduledBatch
    result: StepResult
    samples: dict[int, int | None]
    needs_host: bool  # a beam round or a fork: complete it before scheduling the next step
    want_top: bool  # some row wants its top logprobs (the sampler computed them): fetch them
    prompt_rows: tuple[tuple[int, int], ...] = ()  # (index in batch.seqs, prompt position)


@dataclasses.dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model, recompute included
    steps: int = 0
    host_seconds: float = 0.0  # schedule + prepare + postprocess
    device_seconds: float = 0.0  # dispatch until the sampled tokens are on the host


class LLMEngine:
    def __init__(self, args: EngineArgs, loaded=None, *, block_manager_cls=None):
        """``block_manager_cls`` (benchmarks): a BlockManager subclass to build the block manager
        from, e.g. one that copies forked blocks instead of sharing them (benchmarks/beam.py)."""
        self.args = args
        device_memory.configure_allocator(args.gpu_memory_utilization)  # before JAX starts
        owned = loaded is None  # the engine loads the weights itself: it may consume them
        if owned:
            from pagedjax.models.loader import load_model

            loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype,
                                tokenizer=args.tokenizer, seed=args.seed)
        self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
        self.config = config = EngineConfig.resolve(args, loaded.cfg, loaded.dtype)
        self.max_model_len = config.max_model_len
        cfg = self.cfg
        # q/k/v and gate/up fused; tp > 1: params sharded (KV heads replicated when tp > K)
        # before memory is measured
        self.tp = sharding.TensorParallel.build(cfg, loaded.params, config.tp, consume=owned)
        has_weights = loaded.params is not None
        del loaded  # an owned model's originals go now, before the pool is sized
        self.spec = self._size_pool()
        kv_pool.check_fits(self.spec, self.max_model_len)
        kv_pool.log_capacity(self.spec, self.max_model_len)
        bm_cls = block_manager_cls or (PrefixCachingBlockManager if args.enable_prefix_caching
                                       else BlockManager)
        self.block_manager = bm_cls(self.spec.num_blocks, args.block_size,
                                    **({"salt": hash(cfg)} if args.enable_prefix_caching else {}))
        self.swap_space = swap.make_swap_space(args, self.spec, self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs,
                                   config.max_num_batched_tokens, args.enable_chunked_prefill,
                                   swap_space=self.swap_space)
        interpret = jax.devices()[0].platform == "cpu"
        with faults.explain_oom_at_start("allocating the KV pool", self.spec, self.max_model_len):
            self.runner = ModelRunner(self.tp.cfg, self.tp.params, self.spec,
                                      max_model_len=self.max_model_len,
                                      max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=config.max_num_batched_tokens,
                                      attention_backend=args.attention_backend,
                                      interpret=interpret, mesh=self.tp.mesh)
            self.host_pool = (swap.HostKVPool(self.spec, self.swap_space, self.runner)
                              if self.swap_space is not None else None)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner.stop_ids = frozenset(self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._on_device: list[InFlight] = []  # dispatched, not yet completed (at most 2)
        self._dispatching: ScheduledBatch | None = None  # scheduled, on its way to the device
        self.stats = EngineStats()
        self.fault: str | None = None  # a failed step's error until its reset succeeded (faults.py)
        # called with the engine after each step: a seam for observers such as the benchmarks'
        # step timeline (benchmarks/harness.py), which must not wrap engine methods
        self.step_observers: list = []
        self._arrivals = itertools.count()
        self._seed_rng = np.random.default_rng(args.seed)
        # Engine-level precompilation: every program a step can run, before the first request.
        # Without weights (a stand-in device: benchmarks.host_overhead) there is nothing to run.
        self.precompile = (args.precompile if args.precompile is not None else
                           self.runner.coarse_buckets and not interpret
                           and has_weights)
        self.precompile_s, self.precompile_compilations = 0.0, 0
        if self.precompile:
            self._precompile()

    def _precompile(self) -> None:
        r = self.runner
        c0, t0 = r.num_compilations, time.perf_counter()
        with faults.explain_oom_at_start("precompiling the step", self.spec, self.max_model_len):
            r.warmup()  # logs what it compiled
        self.precompile_s = time.perf_counter() - t0
        self.precompile_compilations = r.num_compilations - c0

    def _size_pool(self) -> kv_pool.KVPoolSpec:
        """The planner's arithmetic (pagedjax.memory_report), fed with this device's numbers."""
        dev = jax.local_devices()[0]  # multi-host: devices()[0] may be another process's
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        self.memory = memory_report(self.config, total_bytes=device_memory.device_bytes(dev),
                                    weights=stats["bytes_in_use"] if stats else None)
        logger.info(format_memory_report(self.memory))
        return kv_pool.KVPoolSpec.for_model(self.tp.cfg, self.memory["num_blocks"],
                                            self.config.block_size, self.config.kv_dtype)

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights?): pass prompt_token_ids")
        return list(self.tokenizer.encode(prompt))

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
        seqs[0].pending_forks, seqs[0].seats = seqs[1:], len(seqs)
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, detoks,
                                            RequestMetrics(arrival_time or time.time()),
                                            max_tokens=max_tokens, stream=stream)
        self.scheduler.add(seqs[0])
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
        seq = Sequence(request_id, ids, sp, next(self._arrivals), seed=0, seats=params.beam_width)
        self.requests[request_id] = Request(
            request_id, text, ids, sp, [seq], [], RequestMetrics(time.time()),
            max_tokens=max_tokens, stream=False, beam=BeamState(params, self.eos_token_ids))
        self.scheduler.add(seq)
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
        need = num_seqs * self.spec.blocks_for(longest)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"{num_seqs} sequences of up to {longest} tokens may need {need} KV blocks at "
                f"once and the pool holds {self.block_manager.num_blocks}: lower n / best_of / "
                "the beam width or max_tokens, or give the KV cache more memory")

    def abort(self, request_id: str) -> None:
        self.end_request(request_id, "abort")

    def end_request(self, request_id: str, reason: str) -> Request | None:
        """Finish every live sequence of a request with ``reason`` and forget the request."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            for s in req.seqs:
                if not s.finished:
                    self.scheduler.finish(s, reason)
        return req

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
            dispatched = self._schedule_and_dispatch()
            while len(self._on_device) > 1 or (self._on_device and (
                    not dispatched or self._on_device[0].needs_host
                    or not self.args.async_scheduling)):
                outputs += self._complete_oldest()
        except Exception as e:  # only the failed steps' requests fail; the KV pool is rebuilt
            failed = [f.batch for f in self._on_device] + [b for b in [self._dispatching] if b]
            self._on_device, self._dispatching = [], None
            return outputs + faults.fail_step(self, failed, e)
        self.stats.host_seconds += time.perf_counter() - t0 - (self.stats.device_seconds - wait0)
        for observe in self.step_observers:
            observe(self)
        return outputs

    def _complete_oldest(self) -> list[RequestOutput]:
        outputs = self._complete(self._on_device[0])
        self._on_device.pop(0)
        return outputs

    def _schedule_and_dispatch(self) -> bool:
        """Schedule the next step and queue it on the device (``self._on_device``)."""
        batch = self.scheduler.schedule()
        if batch.swap_out or batch.swap_in:  # before the step writes into the freed blocks
            t = self.host_pool.execute(batch, self.runner)
            self.stats.device_seconds += t  # transfer time is not host time
        if not batch:
            return False
        self._dispatching = batch
        batch.forks = [(i, child)
                       for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                       if seq.pending_forks and seq.num_computed_tokens + n == seq.num_tokens
                       for child in seq.pending_forks]
        inputs = self.runner.prepare(batch, self.block_manager)
        result = self.runner.execute(inputs)
        # The step is on its way: its tokens count as computed, and each row that samples gets
        # a PLACEHOLDER for its token, filled when the step completes.
        step_id, samples, needs_host = self.runner.step_id, {}, bool(batch.forks)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that is not the last: it samples nothing
            req = self.requests[seq.request_id]
            if req.beam is not None:  # the beam round decides the next tokens
                needs_host = True
                samples[i] = None
                continue
            samples[i] = len(seq.output_token_ids)
            seq.output_token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.pending_src = (step_id, i)
            if (len(seq.output_token_ids) >= req.max_tokens
                    or seq.num_tokens >= self.max_model_len):
                seq.last_token_pending = True
        self._dispatching = None
        self._on_device.append(InFlight(batch, result, samples, needs_host, inputs.mode.top,
                                        inputs.prompt_rows))
        return True

    def _complete(self, f: "InFlight") -> list[RequestOutput]:
        """Wait for a dispatched step's samples and apply them: tokens, finishes, beam rounds,
        forks. Sequences that ended while the step ran (aborted, or stopped by the step before)
        are skipped."""
        t = time.perf_counter()
        result = f.result.to_host(f.want_top)  # the one device wait
        self.stats.device_seconds += time.perf_counter() - t
        self.stats.steps += 1
        batch, now = f.batch, time.time()
        touched: dict[str, Request] = {}
        if f.prompt_rows:
            self._prompt_logprobs(batch, f.prompt_rows, result)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.finished:
                continue
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.stats.computed_tokens += n
            if i not in f.samples:  # a prefill chunk that is not the last
                self.block_manager.commit_full_blocks(seq.seq_id, seq.tokens,
                                                      min(seq.num_computed_tokens,
                                                          seq.num_known_tokens))
                continue
            if req.beam is not None:
                self.block_manager.commit_full_blocks(seq.seq_id, seq.tokens,
                                                      seq.num_computed_tokens)
                req.beam_candidates[seq.seq_id] = list(zip(result.top_logprobs[i].tolist(),
                                                           result.top_ids[i].tolist()))
                if len(req.beam_candidates) == len(req.seqs):
                    self._beam_round(req)
                    touched[req.request_id] = req
                continue
            for child in seq.pending_forks:  # n > 1: the samples share the prompt's blocks
                self.block_manager.fork(seq.seq_id, child.seq_id)
                child.num_computed_tokens = seq.num_computed_tokens
                self.scheduler.insert_running(child)
            seq.pending_forks, seq.seats = [], 1  # the samples now hold their own seats
            self._append(req, seq, result, i, now, at=f.samples[i])
            if not seq.finished:
                self.block_manager.commit_full_blocks(seq.seq_id, seq.tokens,
                                                      min(seq.num_computed_tokens,
                                                          seq.num_known_tokens))
            touched[req.request_id] = req
        for j, (_, child) in enumerate(batch.forks, start=len(batch.seqs)):
            if not child.finished:
                self._append(self.requests[child.request_id], child, result, j, now)
        outputs = []
        for r in touched.values():
            finished = r.finished
            if finished:
                r.metrics.finished_time = now
                del self.requests[r.request_id]
            if finished or r.stream:
                outputs.append(self._output(r))
        return outputs

    @staticmethod
    def _prompt_logprobs(batch: ScheduledBatch, rows, result: StepResult) -> None:
        """Record the prompt logprobs a step computed, in vLLM's shape: the top k plus the
        prompt token itself."""
        own = result.prompt_logprobs.tolist()
        tops, ids = result.prompt_top_logprobs.tolist(), result.prompt_top_ids.tolist()
        for q, (i, pos) in enumerate(rows):
            seq = batch.seqs[i]
            if seq.finished:
                continue
            k = seq.params.prompt_logprobs
            entry = dict(zip(ids[q][:k], tops[q][:k])) if k else {}
            entry[seq.prompt_token_ids[pos + 1]] = own[q]
            seq.prompt_logprobs[pos + 1] = entry

    def _beam_round(self, req: Request) -> None:
        """All live beams have their candidates: pick the next beams, fork their blocks from
        their parents (copy-on-write on the next write), free the rest."""
        old = req.seqs
        parents = req.beam.step([req.beam_candidates[s.seq_id] for s in old])
        req.beam_candidates.clear()
        new = []
        for j, (b, token) in enumerate(parents):
            parent = old[b]
            child = Sequence(req.request_id, req.prompt_token_ids, parent.params, parent.arrival,
                             seed=0, index=j, output_token_ids=parent.output_token_ids + [token])
            self.block_manager.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens if parent.num_computed_tokens \
                == parent.num_tokens else 0
            new.append(child)
        for seq in old:
            self.scheduler.finish(seq, "stop")
        for child in new:
            if child.num_computed_tokens:
                self.scheduler.insert_running(child)
            else:  # its parent had been preempted: recompute
                self.block_manager.free(child.seq_id)
                self.scheduler.add(child)
        self.stats.generation_tokens += len(new)
        req.seqs = new

    def _append(self, req: Request, seq: Sequence, result, row: int, now: float,
                at: int | None = None) -> None:
        """Record the token of ``row`` (into its PLACEHOLDER ``at``, else appended) and finish
        the sequence if it ends here; a finished sequence drops its later placeholders."""
        token, logprob = int(result.tokens[row]), float(result.logprobs[row])
        if at is None:
            seq.output_token_ids.append(token)
        else:
            seq.output_token_ids[at] = token
            seq.num_pending -= 1
        seq.output_logprobs.append(logprob)
        seq.cumulative_logprob += logprob
        k = req.params.logprobs
        if k is not None:  # vLLM's shape: the top k plus the sampled token
            top = dict(zip(result.top_ids[row, :k].tolist(),
                           result.top_logprobs[row, :k].tolist())) if k else {}
            top[token] = logprob
            seq.output_top_logprobs.append(top)
        self.stats.generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        p = req.params
        detok = req.detoks[seq.index]
        if detok is not None and (req.stream or p.stop):
            detok.add(token)  # offline requests without stop strings decode once, at the end
        if token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", None)
        if detok is not None and p.stop:
            if seq.num_known_tokens - len(seq.prompt_token_ids) <= p.min_tokens:
                seq.stop_check_from = len(detok.text)  # as vLLM: no stop strings before then
            else:
                for s in p.stop:
                    cut = detok.text.find(s, max(seq.stop_check_from - len(s) + 1, 0))
                    if cut >= 0:
                        detok.text = detok.text[:cut]
                        return self._finish(seq, "stop", s)
        known = seq.num_known_tokens
        if known - len(seq.prompt_token_ids) >= req.max_tokens or known >= self.max_model_len:
            return self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        if seq.num_pending:  # tokens sampled after the end by a step already dispatched
            del seq.output_token_ids[-seq.num_pending:]
            seq.num_pending = 0
        self.scheduler.finish(seq, reason, stop_reason)

    def _output(self, req: Request) -> RequestOutput:
        if req.beam is not None:
            return self._beam_output(req)
        outs = []
        for seq, detok in zip(req.seqs, req.detoks):
            if detok is not None and not req.stream and not req.params.stop:
                text = self._decode(seq.output_token_ids, req.params.skip_special_tokens)
            else:
                text = detok.text if detok else ""
            outs.append(CompletionOutput(
                index=seq.index, text=text,
                token_ids=list(seq.output_token_ids), cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.output_top_logprobs) if req.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if req.params.best_of > req.params.n and req.finished:
            outs = sorted(outs, key=lambda o: -o.cumulative_logprob)[:req.params.n]
        plp = req.seqs[0].prompt_logprobs
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished, req.metrics,
                             prompt_logprobs=list(plp) if plp is not None else None)

    def _beam_output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=self._decode(h.tokens), token_ids=h.tokens,
                                 cumulative_logprob=h.cum_logprob, logprobs=None,
                                 finish_reason="stop" if h.ended_by_eos else "length",
                                 stop_reason=h.score)
                for i, h in enumerate(req.beam.best())] if req.beam.done else []
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished, req.metrics)

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return (self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
                if self.tokenizer else "")

    # ---- introspection -----------------------------------------------------------------------
    def make_stats(self) -> EngineSnapshot:
        """Every counter and gauge of the engine's parts, in one snapshot (pagedjax.stats)."""
        s, sched, bm = self.stats, self.scheduler, self.block_manager
        swapped = self.host_pool.landed.blocks if self.host_pool is not None else {}
        return EngineSnapshot(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_swapped=len(sched.swapped), kv_cache_usage=bm.usage,
            cpu_cache_usage=self.swap_space.usage if self.swap_space is not None else 0.0,
            prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens,
            computed_tokens=s.computed_tokens, steps=s.steps, host_seconds=s.host_seconds,
            device_seconds=s.device_seconds, num_preemptions=sched.num_preemptions,
            num_preemptions_swap=sched.num_preemptions_swap,
            num_preemptions_recompute=sched.num_preemptions_recompute,
            prefix_cache_queries=bm.queries, prefix_cache_hits=bm.hits,
            num_compilations=self.runner.num_compilations,
            swap_out_blocks=swapped.get("out", 0), swap_in_blocks=swapped.get("in", 0))

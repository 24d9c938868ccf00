"""LLMEngine: requests in, outputs out, one ``step()`` at a time (schedule -> run -> postprocess)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax
import numpy as np

from . import kv_pool
from .block_manager import BlockManager
from .config import EngineArgs
from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30  # without an accelerator to measure, the pool gets 1 GiB


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

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclasses.dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model, recompute included
    steps: int = 0
    host_seconds: float = 0.0  # schedule + prepare + postprocess
    device_seconds: float = 0.0  # dispatch until the sampled tokens are on the host


class LLMEngine:
    def __init__(self, args: EngineArgs, loaded=None):
        self.args = args
        if loaded is None:
            from pagedjax.models.loader import load_model

            loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype,
                                tokenizer=args.tokenizer, seed=args.seed)
        self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
        self.dtype = loaded.dtype
        cfg = self.cfg
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"--max-model-len {self.max_model_len} is larger than the model's maximum "
                f"({cfg.max_position_embeddings} positions): lower --max-model-len")
        self.max_num_batched_tokens = args.max_num_batched_tokens or max(
            2048, args.max_num_seqs if args.enable_chunked_prefill else self.max_model_len)
        if not args.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens {self.max_num_batched_tokens} is smaller than "
                f"--max-model-len {self.max_model_len} with chunked prefill off: a long prompt "
                "could never be scheduled; raise it or enable chunked prefill")
        num_blocks = self._num_blocks(args, loaded)
        self.spec = kv_pool.KVPoolSpec.for_model(cfg, num_blocks, args.block_size, self.dtype)
        kv_pool.check_fits(self.spec, self.max_model_len)
        kv_pool.log_capacity(self.spec, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, args.block_size)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs,
                                   self.max_num_batched_tokens, args.enable_chunked_prefill)
        interpret = jax.devices()[0].platform == "cpu"
        self.runner = ModelRunner(cfg, loaded.params, self.spec, max_model_len=self.max_model_len,
                                  max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=self.max_num_batched_tokens,
                                  attention_backend=args.attention_backend, interpret=interpret)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._arrivals = itertools.count()
        self._seed_rng = np.random.default_rng(args.seed)

    def _num_blocks(self, args: EngineArgs, loaded) -> int:
        if args.num_gpu_blocks_override:
            return args.num_gpu_blocks_override
        budget = args.kv_cache_memory_bytes
        if budget is None:
            dev = jax.devices()[0]
            stats = dev.memory_stats() if dev.platform != "cpu" else None
            if not stats:
                budget = CPU_DEFAULT_KV_BYTES
            else:
                # The weights are resident; leave room for the step's activations (estimated as
                # the logits plus a few hidden-state copies at the token budget).
                t, cfg = self.max_num_batched_tokens, self.cfg
                activations = t * (cfg.vocab_size * 4 + 16 * cfg.intermediate_size * 2)
                budget = int(stats["bytes_limit"] * args.gpu_memory_utilization
                             - stats["bytes_in_use"] - activations)
                logger.info("memory: limit %.2f GiB, weights %.2f GiB, activations ~%.2f GiB, "
                            "KV budget %.2f GiB", stats["bytes_limit"] / kv_pool.GiB,
                            stats["bytes_in_use"] / kv_pool.GiB, activations / kv_pool.GiB,
                            budget / kv_pool.GiB)
        return kv_pool.num_blocks_for_budget(budget, self.cfg, args.block_size, self.dtype)

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
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if text is not None else [int(t) for t in prompt]
        self.validate_prompt(ids)
        max_tokens = params.max_tokens
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1))
        arrival = next(self._arrivals)
        seqs = [Sequence(request_id, ids, params, arrival, seed=(seed + i) % (2**31 - 1), index=i)
                for i in range(params.best_of)]
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        req = Request(request_id, text, ids, params, seqs, detoks,
                      RequestMetrics(arrival_time or time.time()),
                      max_tokens=min(max_tokens or self.max_model_len, self.max_model_len - len(ids)),
                      stream=stream)
        self.requests[request_id] = req
        for s in seqs:
            self.scheduler.add(s)
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

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                self.scheduler.finish(s, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        packed, layout = self.runner.prepare(batch, self.block_manager)
        t1 = time.perf_counter()
        tokens, logprobs = self.runner.execute(packed, layout)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)  # the one device wait
        t2 = time.perf_counter()
        outputs = self._postprocess(batch, tokens, logprobs)
        self.stats.steps += 1
        self.stats.device_seconds += t2 - t1
        self.stats.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return outputs

    def _postprocess(self, batch, tokens, logprobs) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, Request] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            seq.num_computed_tokens += n
            self.stats.computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that is not the last: its sample is discarded
            self._append(req, seq, int(tokens[i]), float(logprobs[i]), now)
            touched[req.request_id] = req
        outputs = []
        for r in touched.values():
            finished = r.finished
            if finished:
                r.metrics.finished_time = now
                del self.requests[r.request_id]
            if finished or r.stream:
                outputs.append(self._output(r))
        return outputs

    def _append(self, req: Request, seq: Sequence, token: int, logprob: float, now: float) -> None:
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.cumulative_logprob += logprob
        self.stats.generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        p = req.params
        detok = req.detoks[seq.index]
        if detok is not None:
            detok.add(token)
        if token in p.stop_token_ids:
            return self.scheduler.finish(seq, "stop", token)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self.scheduler.finish(seq, "stop", None)
        if detok is not None and p.stop:
            for s in p.stop:
                at = detok.text.find(s)
                if at >= 0:
                    detok.text = detok.text[:at]
                    return self.scheduler.finish(seq, "stop", s)
        if len(seq.output_token_ids) >= req.max_tokens or seq.num_tokens >= self.max_model_len:
            return self.scheduler.finish(seq, "length")

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq, detok in zip(req.seqs, req.detoks):
            outs.append(CompletionOutput(
                index=seq.index, text=detok.text if detok else "",
                token_ids=list(seq.output_token_ids), cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.output_logprobs) if req.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if req.params.best_of > req.params.n and req.finished:
            outs = sorted(outs, key=lambda o: -o.cumulative_logprob)[:req.params.n]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished, req.metrics)

    # ---- introspection -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

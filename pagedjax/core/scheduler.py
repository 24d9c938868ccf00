"""Continuous batching: which sequences run this step, and how many of their tokens.

Every sequence is treated alike: it has ``num_tokens`` (prompt + outputs) and
``num_computed_tokens`` (in the KV cache); a step computes the next chunk of the difference. A
decode is a chunk of one; a prompt is prefilled in chunks when the token budget
(``max_num_batched_tokens``) is smaller than it, mixed with other sequences' decodes. Running
sequences go first (oldest first), then waiting ones (FCFS). When blocks run out, the most
recently arrived running sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the waiting queue, keeping its generated tokens. Nothing is ever dropped.
With ``--preemption-mode swap`` the victim's blocks move to the host swap space instead while it
has room (else recompute, logged), and swapped sequences come back before any new prompt.
A gang (a beam group's live beams) is preempted (by recompute) and admitted as one.

The scheduler is the only writer of request and sequence state: ``schedule()`` also counts the
scheduled tokens as computed and gives each sampling row a PLACEHOLDER token (the step is on its
way: async scheduling), and ``update_from_output`` applies a finished step's samples.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import sys
import time
from collections import deque

from pagedjax.core.batch import ScheduledBatch, build_arrays, prompt_rows
from pagedjax.core.block_manager import BlockManager
from pagedjax.outputs import RequestOutput
from pagedjax.core.request import Request
from pagedjax.core.sequence import PLACEHOLDER, Sequence, Status
from pagedjax.core.swap_space import SwapSpace

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenCounts:
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model, recompute included


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, swap_space: SwapSpace | None = None, *,
                 max_model_len: int = sys.maxsize, eos_token_ids: frozenset[int] = frozenset(),
                 vocab_size: int = 0, decode=None, stats=None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.decode = decode or (lambda ids, skip_special_tokens: "")
        self.stats = stats if stats is not None else TokenCounts()  # counters it adds to
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0
        self.swap = swap_space  # None: preemption by recompute only
        self.swapped: deque[Sequence] = deque()  # sorted by arrival
        self.num_preemptions_swap = 0
        self.num_preemptions_recompute = 0
        self.num_steps = 0  # batches scheduled; a PLACEHOLDER's pending_src names its step

    # ---- requests ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self._enqueue(req.seqs[0])

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def end_request(self, request_id: str, reason: str) -> Request | None:
        """Finish every live sequence of a request with ``reason`` and forget the request."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            for s in req.seqs:
                if not s.finished:
                    self.finish(s, reason)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _gang(self, seq: Sequence) -> list[Sequence]:
        return self.requests[seq.request_id].gang(seq) or [seq]

    def _seats(self, seq: Sequence) -> int:
        return self.requests[seq.request_id].seats(seq)

    def seats_taken(self) -> int:
        """Running slots in use: a sequence that will still fork (n > 1 before its prompt is
        done, a beam group before its first round) holds one for each sequence it will become."""
        return sum(self._seats(s) for s in self.running)

    # ---- schedule ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], self.bm.pending_copies)
        self.bm.pending_copies = []
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            gang = self.requests[seq.request_id].gang(seq)  # its members sit together
            if gang is None:
                n = min(seq.num_uncomputed, budget)
                gang, plan = (seq,), [(seq, n)] if n else []
            else:
                plan = self._plan(gang, budget)
            if not plan:  # nothing to compute: a beam waiting for its siblings' candidates
                i += len(gang)
                continue
            # running[i + len(gang):] are younger and not yet scheduled: victims come from there,
            # and the gang itself goes when it is the youngest left.
            while not self._fits(plan):
                victims = self._preempt(self.running[-1], batch)
                batch.num_preempted += len(victims)
                if seq in victims:
                    break
            else:
                for s, n in plan:
                    self._take(batch, s, n)
                    budget -= n
                i += len(gang)
        # no admissions in a step that had to preempt
        if not batch.num_preempted and (self.swapped or self.waiting):
            budget = self._swap_in(batch, budget)
            seats = self.seats_taken()  # summed once; admissions below add their own
            while (not self.swapped and self.waiting and len(self.running) < self.max_num_seqs
                   and budget > 0):
                admitted = self._admit(self.waiting[0], batch, budget, seats)
                if admitted is None:
                    break
                budget, seats = budget - admitted[0], seats + admitted[1]
        batch.offload_out, batch.offload_in = self.bm.take_transfers()
        if batch:
            self._close(batch)
        return batch

    def _plan(self, gang: list[Sequence], budget: int, whole: bool = False):
        """(sequence, tokens) for the gang's members this step, within ``budget``; ``whole``:
        a member gets all its uncomputed tokens or none (chunked prefill off)."""
        plan = []
        for s in gang:
            n = min(s.num_uncomputed, budget)
            if n > 0 and not (whole and n < s.num_uncomputed):
                plan.append((s, n))
                budget -= n
        return plan

    def _fits(self, plan) -> bool:
        if len(plan) == 1:
            s, n = plan[0]
            return self.bm.can_append(s.seq_id, s.num_computed_tokens, n)
        return self.bm.can_append_all([(s.seq_id, s.num_computed_tokens, n) for s, n in plan])

    def _admit(self, seq: Sequence, batch: ScheduledBatch, budget: int, seats: int):
        """Move ``seq``'s gang from waiting to running and schedule up to ``budget`` of their
        tokens; returns (tokens, seats taken), or None (nothing changed) when it cannot start."""
        gang = self._gang(seq)
        need = sum(self._seats(s) for s in gang)
        if self.running and seats + need > self.max_num_seqs:
            return None
        if seq.last_token_pending:  # preempted while its final token was on the device
            return None
        cached = []
        for s in gang:
            # prompt logprobs come from computing the prompt: such a request skips the cache
            if (s.num_computed_tokens == 0 and not self.bm.table(s.seq_id)
                    and s.params.prompt_logprobs is None):
                s.num_computed_tokens = self.bm.match_prefix(s.seq_id, s.tokens(0, s.num_tokens))
                cached.append(s)
        plan = self._plan(gang, budget, whole=not self.chunked)
        if not plan or not self._fits(plan):
            for s in cached:  # give the cached blocks back until the gang can start
                self.bm.free(s.seq_id)
                s.num_computed_tokens = 0
            return None
        metrics = self.requests[seq.request_id].metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.time()
        for s in gang:
            self.waiting.remove(s)
            self.insert_running(s)
        for s, n in plan:
            self._take(batch, s, n)
        return sum(n for _, n in plan), need

    def insert_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.copies += self.bm.append_slots(seq.seq_id, seq.num_computed_tokens, n)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> list[Sequence]:
        """Preempt ``seq``'s gang; returns it. A gang is recomputed: its beams' candidates stay
        valid, and the round waits until every beam is computed again."""
        gang = self.requests[seq.request_id].gang(seq)
        if gang is None:
            self._preempt_one(seq, batch, swap=True)
            return [seq]
        for s in reversed(gang):  # to the front of the waiting queue, in order
            self._preempt_one(s, batch, swap=False)
        return gang

    def _preempt_one(self, seq: Sequence, batch: ScheduledBatch, swap: bool) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        self.requests[seq.request_id].num_preemptions += 1
        if self.swap is not None and swap and seq.num_uncomputed > 0:
            if self.swap.can_swap_out(self.bm, seq.seq_id):
                batch.swap_out += self.swap.swap_out(self.bm, seq.seq_id)
                seq.status = Status.SWAPPED
                bisect.insort(self.swapped, seq, key=lambda s: s.arrival)
                self.num_preemptions_swap += 1
                logger.debug("preempted seq %d (request %s) by swap", seq.seq_id, seq.request_id)
                return
            logger.warning("host swap pool full: preempting seq %d by recompute (%d of %d host "
                           "pieces free; raise --swap-space)", seq.seq_id, self.swap.bm.num_free,
                           self.swap.num_pieces)
        self.bm.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_recompute += 1
        logger.debug("preempted seq %d (request %s) by recompute", seq.seq_id, seq.request_id)

    def _swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        """Swapped sequences come back (oldest first) and run this step, while the device has
        room; returns the token budget left."""
        seats = self.seats_taken()  # summed once; swap-ins below add their own
        while self.swapped and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.swapped[0]
            need = self._seats(seq)
            if self.running and seats + need > self.max_num_seqs:
                break
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not self.chunked:
                break
            if not self.swap.can_swap_in(self.bm, seq, n):
                break
            self.swapped.popleft()
            batch.swap_in += self.swap.swap_in(self.bm, seq.seq_id)
            self.insert_running(seq)
            seats += need
            self._take(batch, seq, n)
            budget -= n
        return budget

    def _close(self, batch: ScheduledBatch) -> None:
        """The batch is complete: build its arrays, then count its tokens as computed and give
        each row that samples a PLACEHOLDER for its token (filled by update_from_output)."""
        self.num_steps += 1
        reqs = [self.requests[s.request_id] for s in batch.seqs]
        for i, (seq, n, req) in enumerate(zip(batch.seqs, batch.num_new_tokens, reqs)):
            if req.unforked and seq.num_computed_tokens + n == seq.num_tokens:
                batch.forks += [(i, child) for child in req.forks_of(seq)]
        batch.needs_host = bool(batch.forks)
        batch.prompt_rows = prompt_rows(batch.seqs, batch.num_new_tokens)
        batch.arrays = build_arrays(batch, self.bm, self.num_steps, self.vocab_size,
                                    self.eos_token_ids)
        for i, (seq, n, req) in enumerate(zip(batch.seqs, batch.num_new_tokens, reqs)):
            seq.num_computed_tokens += n
            # bounded KV: blocks no later query sees are freed now; this step still reads them,
            # and runs on the device before any later step that could reuse them
            self.bm.release_outside_window(seq.seq_id, seq.num_computed_tokens)
            num_tokens = seq.num_tokens
            if seq.num_computed_tokens < num_tokens:
                continue  # a prefill chunk that is not the last: it samples nothing
            if not req.samples_async:
                batch.needs_host = True
                batch.samples[i] = None
                continue
            batch.samples[i] = len(seq.output_token_ids)
            seq.output_token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.pending_src = (self.num_steps, i)
            if len(seq.output_token_ids) >= req.max_tokens or num_tokens >= self.max_model_len:
                seq.last_token_pending = True

    # ---- update ------------------------------------------------------------------------------
    def update_from_output(self, batch: ScheduledBatch, result) -> list[RequestOutput]:
        """Apply a completed step's samples (``result``: a StepResult on the host): tokens,
        stops, n > 1 forks, beam rounds; returns the outputs of the requests it changed (all of
        them when streaming, else the finished ones). Sequences that ended while the step ran
        (aborted, or stopped by the step before) are skipped."""
        now = time.time()
        touched: dict[str, Request] = {}
        if batch.prompt_rows:
            self._prompt_logprobs(batch, result)
        want_top = result.top_ids is not None
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.finished:
                continue
            req = self.requests[seq.request_id]
            self.stats.computed_tokens += n
            if i not in batch.samples:  # a prefill chunk that is not the last
                self.bm.commit_full_blocks(seq.seq_id, seq.tokens,
                                           min(seq.num_computed_tokens, seq.num_known_tokens))
                continue
            if batch.samples[i] is None:  # the host picks the next tokens: a beam round
                self.bm.commit_full_blocks(seq.seq_id, seq.tokens, seq.num_computed_tokens)
                pairs = req.add_candidates(seq, result.top_logprobs[i].tolist(),
                                           result.top_ids[i].tolist())
                if pairs is not None:
                    self._replace(req, pairs)
                    touched[req.request_id] = req
                continue
            for child in req.forks_of(seq):  # n > 1: the samples share the prompt's blocks
                self.bm.fork(seq.seq_id, child.seq_id)
                child.num_computed_tokens = seq.num_computed_tokens
                self.insert_running(child)
            req.unforked = []
            self._add_token(req, seq, result, i, now, want_top, at=batch.samples[i])
            if not seq.finished:
                self.bm.commit_full_blocks(seq.seq_id, seq.tokens,
                                           min(seq.num_computed_tokens, seq.num_known_tokens))
            touched[req.request_id] = req
        for j, (_, child) in enumerate(batch.forks, start=len(batch.seqs)):
            if not child.finished:
                self._add_token(self.requests[child.request_id], child, result, j, now, want_top)
        outputs = []
        for r in touched.values():
            finished = r.finished
            if finished:
                r.metrics.finished_time = now
                del self.requests[r.request_id]
            if finished or r.stream:
                outputs.append(r.output(self.decode))
        return outputs

    def _add_token(self, req: Request, seq: Sequence, result, row: int, now: float,
                   want_top: bool, at: int | None = None) -> None:
        token, logprob = int(result.tokens[row]), float(result.logprobs[row])
        top = None
        k = req.params.logprobs
        if k is not None:  # vLLM's shape: the top k plus the sampled token
            top = dict(zip(result.top_ids[row, :k].tolist(),
                           result.top_logprobs[row, :k].tolist())) if k and want_top else {}
            top[token] = logprob
        self.stats.generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        end = req.add_token(seq, token, logprob, top, self.eos_token_ids, self.max_model_len, at)
        if end is not None:
            self.finish(seq, *end)

    def _replace(self, req: Request, pairs: list[tuple[Sequence, Sequence]]) -> None:
        """A gang's next sequences, each forked from its (computed) parent; the parents end."""
        for parent, child in pairs:
            self.bm.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
        for seq in req.seqs:
            self.finish(seq, "stop")
        for _, child in pairs:
            self.insert_running(child)
        self.stats.generation_tokens += len(pairs)
        req.seqs = [child for _, child in pairs]

    @staticmethod
    def _prompt_logprobs(batch: ScheduledBatch, result) -> None:
        """Record the prompt logprobs a step computed, in vLLM's shape: the top k plus the
        prompt token itself."""
        own = result.prompt_logprobs.tolist()
        tops, ids = result.prompt_top_logprobs.tolist(), result.prompt_top_ids.tolist()
        for q, (i, pos) in enumerate(batch.prompt_rows):
            seq = batch.seqs[i]
            if seq.finished:
                continue
            k = seq.params.prompt_logprobs
            entry = dict(zip(ids[q][:k], tops[q][:k])) if k else {}
            entry[seq.prompt_token_ids[pos + 1]] = own[q]
            seq.prompt_logprobs[pos + 1] = entry

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End ``seq``: its blocks are freed, and tokens sampled after its end by a step already
        dispatched (trailing PLACEHOLDERs) are dropped."""
        if seq.num_pending:
            del seq.output_token_ids[-seq.num_pending:]
            seq.num_pending = 0
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.bm.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self.swap.free(seq.seq_id)

    # ---- a failed device step (pagedjax.worker.faults) --------------------------------------
    def fail(self, batches: list[ScheduledBatch], message: str) -> list[RequestOutput]:
        """The steps of ``batches`` failed on the device and every KV block is lost: their
        requests finish with ``finish_reason="error"`` (final outputs returned, ``error`` set);
        every other sequence goes back to the front of the waiting queue to be recomputed (its
        generated tokens kept); cached prefixes and pending block copies are forgotten."""
        now = time.time()
        outputs = []
        for rid in dict.fromkeys(s.request_id for b in batches for s in b.seqs):
            req = self.end_request(rid, "error")
            if req is None:
                continue
            req.metrics.finished_time = now
            out = req.output(self.decode)
            outputs.append(dataclasses.replace(out, finished=True, error=message))
        survivors = sorted([*self.running, *self.swapped], key=lambda s: s.arrival)
        for seq in [*survivors, *self.waiting]:
            self.bm.free(seq.seq_id)
            if self.swap is not None:
                self.swap.free(seq.seq_id)
            seq.num_computed_tokens = 0
            seq.status = Status.WAITING
        self.running.clear()
        self.swapped.clear()
        self.waiting.extendleft(reversed(survivors))  # oldest first, ahead of new prompts
        self.num_preemptions += len(survivors)
        self.num_preemptions_recompute += len(survivors)
        self.bm.pending_copies = []
        self.bm.drop_cache()
        if self.bm.num_free != self.bm.num_blocks:
            raise RuntimeError(f"{self.bm.num_blocks - self.bm.num_free} KV blocks are still "
                               "held by no live sequence after a failed step; the engine cannot "
                               "recover")
        logger.warning("%d sequence(s) will be recomputed", len(survivors))
        return outputs

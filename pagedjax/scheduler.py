"""Continuous batching: which sequences run this step, and how many of their tokens.

Every sequence is treated alike: it has ``num_tokens`` (prompt + outputs) and
``num_computed_tokens`` (in the KV cache); a step computes the next chunk of the difference. A
decode is a chunk of one; a prompt is prefilled in chunks when the token budget
(``max_num_batched_tokens``) is smaller than it, mixed with other sequences' decodes. Running
sequences go first (oldest first), then waiting ones (FCFS). When blocks run out, the most
recently arrived running sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the waiting queue, keeping its generated tokens. Nothing is ever dropped.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    copies: list[tuple[int, int]]  # copy-on-write block copies to make before the step
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], [])
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            # running[i + 1:] are younger than seq and not yet scheduled: victims come from there,
            # and seq itself goes when it is the youngest left.
            while not self.bm.can_append(seq.seq_id, seq.num_computed_tokens, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self._take(batch, seq, n)
                budget -= n
                i += 1
        if batch.num_preempted:
            return batch  # no admissions in a step that had to preempt
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not self.chunked:
                break
            if not self.bm.can_append(seq.seq_id, seq.num_computed_tokens, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            self._take(batch, seq, n)
            budget -= n
        return batch

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.copies += self.bm.append_slots(seq.seq_id, seq.num_computed_tokens, n)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted seq %d (request %s) by recompute", seq.seq_id, seq.request_id)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.bm.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

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
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status
from .swap_space import SwapSpace

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    copies: list[tuple[int, int]]  # copy-on-write block copies to make before the step
    num_preempted: int = 0
    # (index in seqs, child): the child's first token is sampled from that parent's logits
    forks: list = dataclasses.field(default_factory=list)
    # block moves to make before the step: (device block, host slot) out, (host slot, device) in
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, swap_space: SwapSpace | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0
        self.swap = swap_space  # None: preemption by recompute only
        self.swapped: deque[Sequence] = deque()  # sorted by arrival
        self.num_preemptions_swap = 0
        self.num_preemptions_recompute = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], self.bm.pending_copies)
        self.bm.pending_copies = []
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 0:  # a beam waiting for its siblings' candidates
                i += 1
                continue
            # running[i + 1:] are younger than seq and not yet scheduled: victims come from there,
            # and seq itself goes when it is the youngest left.
            while not self.bm.can_append(seq.seq_id, seq.num_computed_tokens, n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self._take(batch, seq, n)
                budget -= n
                i += 1
        if batch.num_preempted:
            return batch  # no admissions in a step that had to preempt
        budget = self._swap_in(batch, budget)
        seats = self.seats_taken()  # summed once; admissions below add their own
        # A beam that has its candidates waits, holding its blocks, until every sibling has
        # theirs: a sibling in the waiting queue goes first (ahead of swapped sequences and older
        # prompts, which may need those very blocks), or neither could ever run.
        stalled = {s.request_id for s in self.running if s.num_uncomputed == 0
                   and not s.last_token_pending}
        for seq in [w for w in self.waiting if w.request_id in stalled]:
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            n = self._admit(seq, batch, budget, seats)
            if n is None:
                break
            budget, seats = budget - n, seats + seq.seats
        while (not self.swapped and self.waiting and len(self.running) < self.max_num_seqs
               and budget > 0):
            seq = self.waiting[0]
            n = self._admit(seq, batch, budget, seats)
            if n is None:
                break
            budget, seats = budget - n, seats + seq.seats
        return batch

    def _admit(self, seq: Sequence, batch: ScheduledBatch, budget: int, seats: int) -> int | None:
        """Move ``seq`` from waiting to running and schedule up to ``budget`` of its tokens;
        returns how many, or None (nothing changed) when it cannot start this step."""
        if self.running and seats + seq.seats > self.max_num_seqs:
            return None
        if seq.last_token_pending:  # preempted while its final token was on the device
            return None
        cached = 0
        # prompt logprobs come from computing the prompt: such a request skips the cache (vLLM)
        if (seq.num_computed_tokens == 0 and not self.bm.table(seq.seq_id)
                and seq.params.prompt_logprobs is None):
            cached = self.bm.match_prefix(seq.seq_id, seq.tokens(0, seq.num_tokens))
            seq.num_computed_tokens = cached
        n = min(seq.num_uncomputed, budget)
        if ((n < seq.num_uncomputed and not self.chunked)
                or not self.bm.can_append(seq.seq_id, seq.num_computed_tokens, n)):
            if cached:  # give the cached blocks back until the sequence can start
                self.bm.free(seq.seq_id)
                seq.num_computed_tokens = 0
            return None
        self.waiting.remove(seq)
        self.insert_running(seq)
        self._take(batch, seq, n)
        return n

    def seats_taken(self) -> int:
        """Running slots in use: a sequence that will still fork (n > 1 before its prompt is
        done, a beam before its first round) holds one for each sequence it will become."""
        return sum(s.seats for s in self.running)

    def insert_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.copies += self.bm.append_slots(seq.seq_id, seq.num_computed_tokens, n)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        # A sequence with nothing left to compute (a beam waiting for its siblings) is recomputed:
        # the beam step forks from its blocks on the device.
        if self.swap is not None and seq.num_uncomputed > 0:
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
            if self.running and seats + seq.seats > self.max_num_seqs:
                break
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not self.chunked:
                break
            if not self.swap.can_swap_in(self.bm, seq, n):
                break
            self.swapped.popleft()
            batch.swap_in += self.swap.swap_in(self.bm, seq.seq_id)
            self.insert_running(seq)
            seats += seq.seats
            self._take(batch, seq, n)
            budget -= n
        return budget

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
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

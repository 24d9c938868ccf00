"""What the scheduler hands the runner: the sequences of one step and, built from them on the host,
the plain numpy arrays the device step needs. The runner pads these into its bucket shapes and
never reads a Sequence or the block manager.

Rows: 0..R-1 are the scheduled sequences; R..R+F-1 sample the first token of each n > 1 child
forked this step, from its parent's logits.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from pagedjax.worker import penalties
from pagedjax.core.block_manager import BlockManager
from pagedjax.core.sequence import Sequence

# Per sampling row, one row each of the step's [len(SAMPLING_FIELDS), rows] int32 sampling array.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seeds", "counters", "num_top")
SAMPLING_FLOATS = ("temperature", "top_p", "min_p")  # float32 bits


class BatchArrays(NamedTuple):
    """One step's inputs, unpadded. n: new tokens, R: sequences, B: the longest block table."""

    tokens: np.ndarray  # [n] token ids (0 where token_src names the row instead)
    token_src: np.ndarray  # [n] row of the previous step's samples holding the token, else -1
    positions: np.ndarray  # [n]
    slot_mapping: np.ndarray  # [n] pool slot of each token's K/V
    block_tables: np.ndarray  # [R, B]
    context_lens: np.ndarray  # [R] tokens in the cache after the step
    query_start_loc: np.ndarray  # [R + 1]
    logits_indices: np.ndarray  # [R + F] token row whose logits each sampling row reads
    sampling: np.ndarray  # [len(SAMPLING_FIELDS), R + F] int32
    penalized: list  # (row, params, codes, pending row) per row with penalties / min_tokens
    prompt_index: np.ndarray  # [P] token row of each prompt-logprob row
    prompt_targets: np.ndarray  # [P] the prompt token it scores


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    copies: list[tuple[int, int]]  # copy-on-write block copies to make before the step
    num_preempted: int = 0
    # (index in seqs, child): the child's first token is sampled from that parent's logits
    forks: list[tuple[int, Sequence]] = dataclasses.field(default_factory=list)
    # block moves to make before the step: (device block, host slot) out, (host slot, device) in
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # the host prefix tier's copies, the same way round (pagedjax.core.host_cache)
    offload_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    offload_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # Set by the scheduler once the batch is complete:
    arrays: BatchArrays | None = None
    # per sequence row that samples: the index of its PLACEHOLDER in output_token_ids, or None
    # for a row whose token the host decides (a beam)
    samples: dict[int, int | None] = dataclasses.field(default_factory=dict)
    needs_host: bool = False  # complete this step before scheduling the next (beams, forks)
    prompt_rows: tuple[tuple[int, int], ...] = ()  # (index in seqs, prompt position)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def build_arrays(batch: ScheduledBatch, bm: BlockManager, step: int, vocab_size: int,
                 stop_ids: frozenset[int]) -> BatchArrays:
    """The step's arrays, from the sequences before their new tokens count as computed. ``step``
    numbers this batch: a token still on the device (a PLACEHOLDER) must come from step - 1."""
    seqs, counts = batch.seqs, batch.num_new_tokens
    R, rows, n_tok = len(seqs), len(seqs) + len(batch.forks), sum(counts)
    bs = bm.block_size
    tokens = np.zeros(n_tok, np.int32)
    token_src = np.full(n_tok, -1, np.int32)
    positions = np.zeros(n_tok, np.int32)
    slots = np.zeros(n_tok, np.int32)
    tables = [bm.table(s.seq_id) for s in seqs]
    block_tables = np.zeros((R, max(map(len, tables))), np.int32)
    context_lens = np.zeros(R, np.int32)
    qsl = np.zeros(R + 1, np.int32)
    logits_indices = np.zeros(rows, np.int32)
    sampling = np.zeros((len(SAMPLING_FIELDS), rows), np.int32)
    view = dict(zip(SAMPLING_FIELDS, sampling))
    for name in SAMPLING_FLOATS:
        view[name] = view[name].view(np.float32)
    temperature, top_p, top_k, min_p = (view[k] for k in ("temperature", "top_p", "top_k",
                                                          "min_p"))
    seeds, counters, num_top = view["seeds"], view["counters"], view["num_top"]
    penalized = []

    def sampling_row(row: int, seq: Sequence) -> None:
        p = seq.params
        temperature[row], top_p[row], top_k[row], min_p[row] = (
            p.temperature, p.top_p, p.top_k, p.min_p)
        seeds[row] = seq.seed
        counters[row] = len(seq.output_token_ids)
        num_top[row] = p.logprobs or 0
        codes = penalties.row_codes(seq, vocab_size, stop_ids)
        if codes is not None:  # its newest token, if on the device, is the last step's
            pending = seq.pending_src[1] if seq.num_pending else -1
            penalized.append((row, p, codes, pending))

    at = 0
    for i, (seq, n, table) in enumerate(zip(seqs, counts, tables)):
        start = seq.num_computed_tokens
        block_tables[i, :len(table)] = table
        if n == 1:
            tokens[at] = seq.token_at(start)
            positions[at] = start
            slots[at] = table[start // bs] * bs + start % bs
        else:
            pos = np.arange(start, start + n)
            tokens[at:at + n] = seq.tokens(start, start + n)
            positions[at:at + n] = pos
            slots[at:at + n] = np.asarray(table)[pos // bs] * bs + pos % bs
        if seq.num_pending and start + n == seq.num_tokens:  # its last token is on the device
            src_step, row = seq.pending_src
            if src_step != step - 1:
                raise RuntimeError(f"seq {seq.seq_id}: its pending token comes from step "
                                   f"{src_step}, not the step before this one ({step - 1})")
            tokens[at + n - 1] = 0
            token_src[at + n - 1] = row
        at += n
        qsl[i + 1] = at
        context_lens[i] = start + n
        sampling_row(i, seq)
    if bm.window:  # released entries (-1) read as block 0: never attended, but in range
        np.maximum(block_tables, 0, out=block_tables)
    logits_indices[:R] = qsl[1:] - 1
    for j, (parent, child) in enumerate(batch.forks, start=R):
        logits_indices[j] = qsl[parent + 1] - 1
        sampling_row(j, child)
    prompt_index = np.zeros(len(batch.prompt_rows), np.int32)
    prompt_targets = np.zeros(len(batch.prompt_rows), np.int32)
    for q, (i, pos) in enumerate(batch.prompt_rows):
        prompt_index[q] = qsl[i] + pos - seqs[i].num_computed_tokens
        prompt_targets[q] = seqs[i].prompt_token_ids[pos + 1]
    return BatchArrays(tokens, token_src, positions, slots, block_tables, context_lens, qsl,
                       logits_indices, sampling, penalized, prompt_index, prompt_targets)


def prompt_rows(seqs: list[Sequence], counts: list[int]) -> tuple[tuple[int, int], ...]:
    """(index in seqs, prompt position) of every position of this step whose logits give a
    prompt logprob still missing: position i predicts prompt token i + 1."""
    rows = []
    for i, (seq, n) in enumerate(zip(seqs, counts)):
        have = seq.prompt_logprobs
        if have is not None:
            start = seq.num_computed_tokens
            stop = min(start + n, len(seq.prompt_token_ids) - 1)
            rows += [(i, pos) for pos in range(start, stop) if have[pos + 1] is None]
    return tuple(rows)

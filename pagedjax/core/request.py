"""A request's host-side state: its sequences, how a sampled token changes them, and its output.

Two kinds, both owned and changed by the scheduler only (pagedjax.core.scheduler):

- ``Request``: n independent samples (best_of of them). Sample 0 computes the prompt; the others
  are forked from it when its prompt is done (they share its KV blocks), so until then it holds
  one running seat for each of them. A sampled token is appended and checked against the stops.
- ``BeamGroup``: a beam search. Its live beams are one gang: the scheduler preempts and admits
  them together, so a beam never waits for a sibling the pool cannot hold. A sampled row gives
  the beam's top candidates; once every live beam is computed and has them, the round picks the
  next beams (pagedjax.core.beam_search.BeamState), each forked from its parent.

Detokenisation and stop strings live here too: a stop string ends a sequence like a stop token.
"""
from __future__ import annotations

import dataclasses

from pagedjax.core.beam_search import BeamState
from pagedjax.core.detokenizer import IncrementalDetokenizer
from pagedjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedjax.sampling_params import SamplingParams
from pagedjax.core.sequence import Sequence


@dataclasses.dataclass(eq=False)
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
    # n > 1: the samples not yet forked from seqs[0] (they are forked when its prompt is done)
    unforked: list[Sequence] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0  # its sequences' preemptions (pagedjax top shows them)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def samples_async(self) -> bool:
        """A row's token is only appended: the next step may be scheduled before it is known."""
        return True

    def gang(self, seq: Sequence) -> list[Sequence] | None:
        """The sequences that must run with ``seq`` (None: it runs alone)."""
        return None

    def seats(self, seq: Sequence) -> int:
        """Running slots ``seq`` takes: one, plus one per sample still to fork from it."""
        return 1 + len(self.unforked) if self.unforked and seq is self.seqs[0] else 1

    def forks_of(self, seq: Sequence) -> list[Sequence]:
        return self.unforked if self.unforked and seq is self.seqs[0] else []

    def add_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None,
                  eos_token_ids: set[int], max_model_len: int, at: int | None = None):
        """Record ``token`` (into its PLACEHOLDER ``at``, else appended); returns
        ``(finish_reason, stop_reason)`` when the sequence ends here, else None."""
        if at is None:
            seq.output_token_ids.append(token)
        else:
            seq.output_token_ids[at] = token
            seq.num_pending -= 1
        seq.output_logprobs.append(logprob)
        seq.cumulative_logprob += logprob
        if top is not None:
            seq.output_top_logprobs.append(top)
        p = self.params
        detok = self.detoks[seq.index]
        if detok is not None and (self.stream or p.stop):
            detok.add(token)  # offline requests without stop strings decode once, at the end
        if token in p.stop_token_ids:
            return "stop", token
        if not p.ignore_eos and token in eos_token_ids:
            return "stop", None
        if detok is not None and p.stop:
            if seq.num_known_tokens - len(seq.prompt_token_ids) <= p.min_tokens:
                seq.stop_check_from = len(detok.text)  # as vLLM: no stop strings before then
            else:
                for s in p.stop:
                    cut = detok.text.find(s, max(seq.stop_check_from - len(s) + 1, 0))
                    if cut >= 0:
                        detok.text = detok.text[:cut]
                        return "stop", s
        known = seq.num_known_tokens
        if known - len(seq.prompt_token_ids) >= self.max_tokens or known >= max_model_len:
            return "length", None
        return None

    def output(self, decode) -> RequestOutput:
        """The request's output now; ``decode(ids, skip_special_tokens)`` gives text."""
        outs = []
        for seq, detok in zip(self.seqs, self.detoks):
            if detok is not None and not self.stream and not self.params.stop:
                text = decode(seq.output_token_ids, self.params.skip_special_tokens)
            else:
                text = detok.text if detok else ""
            outs.append(CompletionOutput(
                index=seq.index, text=text,
                token_ids=list(seq.output_token_ids), cumulative_logprob=seq.cumulative_logprob,
                logprobs=(list(seq.output_top_logprobs) if self.params.logprobs is not None
                          else None),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if self.params.best_of > self.params.n and self.finished:
            outs = sorted(outs, key=lambda o: -o.cumulative_logprob)[:self.params.n]
        plp = self.seqs[0].prompt_logprobs
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             self.finished, self.metrics,
                             prompt_logprobs=list(plp) if plp is not None else None)


@dataclasses.dataclass(eq=False)
class BeamGroup(Request):
    beam: BeamState | None = None
    # seq_id -> the beam's (logprob, token) candidates, from the step that computed it last
    candidates: dict[int, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.beam.done

    @property
    def samples_async(self) -> bool:
        return False  # the round decides the next tokens

    def gang(self, seq: Sequence) -> list[Sequence]:
        return self.seqs

    def seats(self, seq: Sequence) -> int:
        """The group holds beam_width seats: its first beam all of them until the first round."""
        return self.beam.p.beam_width - len(self.seqs) + 1

    def forks_of(self, seq: Sequence) -> list[Sequence]:
        return []

    def add_candidates(self, seq: Sequence, top_logprobs, top_ids) -> list[tuple[Sequence, Sequence]] | None:
        """Record a computed beam's candidates. When every live beam is computed and has its
        candidates, run the round: returns the (parent, child) pairs of the next beams (empty
        when the search ended); else None."""
        self.candidates[seq.seq_id] = list(zip(top_logprobs, top_ids))
        if not all(s.seq_id in self.candidates and s.num_uncomputed == 0 for s in self.seqs):
            return None
        parents = self.beam.step([self.candidates[s.seq_id] for s in self.seqs])
        self.candidates.clear()
        pairs = []
        for j, (b, token) in enumerate(parents):
            parent = self.seqs[b]
            pairs.append((parent, Sequence(
                self.request_id, self.prompt_token_ids, parent.params, parent.arrival, seed=0,
                index=j, output_token_ids=parent.output_token_ids + [token])))
        return pairs

    def output(self, decode) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=decode(h.tokens, True), token_ids=h.tokens,
                                 cumulative_logprob=h.cum_logprob, logprobs=None,
                                 finish_reason="stop" if h.ended_by_eos else "length",
                                 score=h.score)
                for i, h in enumerate(self.beam.best())] if self.beam.done else []
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             self.finished, self.metrics)

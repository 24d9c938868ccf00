"""Beam search, host side: which beams live, which finished, when to stop.

Semantics follow Hugging Face transformers' ``generate(num_beams=k, do_sample=False,
length_penalty=lp, early_stopping=...)`` exactly, so results can be checked against it:

- each round, every live beam's next-token logprobs (log_softmax of the raw logits) are added to
  its running score; the best 2k (beam, token) candidates over all beams are taken, best first;
- a candidate that ends the sequence (EOS unless ``ignore_eos``, or the ``max_tokens``-th token)
  is finalised only if it ranks among the first k, with score
  ``cumulative_logprob / generated_len ** length_penalty`` (generated_len counts the EOS);
- the best k candidates that do not end become the next live beams;
- search stops when every candidate ends, when ``early_stopping=True`` and k hypotheses are
  finalised, or when HF's heuristic says no live beam can still beat the worst finalised one
  (the best live score divided by the current generated length ** lp, or by max_tokens ** lp
  with ``early_stopping="never"`` and lp > 0).

The engine runs the beams as sequences sharing KV blocks (fork + copy-on-write); this module only
sees candidates and returns which (parent beam, token) pairs continue.
"""
from __future__ import annotations

import dataclasses

NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= 10:
            raise ValueError(f"beam_width must be an integer in [1, 10], got {self.beam_width}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if self.temperature != 0.0:
            raise ValueError("beam search is deterministic here: temperature must be 0.0")
        if not -10.0 <= self.length_penalty <= 10.0:  # len ** lp must stay a finite nonzero float
            raise ValueError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float
    score: float  # cum_logprob / generated_len ** length_penalty
    text: str | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens
    cum_logprob: float
    score: float
    ended_by_eos: bool


class BeamState:
    """One request's beam search. Beams are identified by their index in ``live``."""

    def __init__(self, params: BeamSearchParams, eos_token_ids: set[int]):
        self.p = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.live: list[tuple[list[int], float]] = [([], 0.0)]  # (generated tokens, cum logprob)
        self.finished: list[Hypothesis] = []
        self.improvable = True  # HF's is_early_stop_heuristic_unsatisfied
        self.done = False

    def step(self, candidates: list[list[tuple[float, int]]]) -> list[tuple[int, int]]:
        """candidates[b]: (logprob, token) pairs of live beam b, at least 2k or the whole vocab.
        Returns the next live beams as (parent beam index, token); empty when the search ended."""
        k, lp = self.p.beam_width, self.p.length_penalty
        gen_len = len(self.live[0][0]) + 1  # generated length after this token
        pool = [(score + lpb, b, tok) for b, (_, score) in enumerate(self.live)
                for lpb, tok in candidates[b]]
        pool.sort(key=lambda c: -c[0])
        top = pool[:2 * k]
        ends = [tok in self.eos or gen_len >= self.p.max_tokens for _, _, tok in top]
        all_full = len(self.finished) == k
        can_add = self.improvable and not (all_full and self.p.early_stopping is True)
        if can_add:
            for rank, ((score, b, tok), end) in enumerate(zip(top, ends)):
                if end and rank < k:
                    self._offer(Hypothesis(self.live[b][0] + [tok], score, score / gen_len ** lp,
                                           tok in self.eos))
        nxt = sorted(range(len(top)), key=lambda i: -(top[i][0] + (NEG if ends[i] else 0.0)))[:k]
        # as in HF, a beam filled in from an ending candidate keeps the penalty in its score
        new_live = [(self.live[top[i][1]][0] + [top[i][2]], top[i][0] + (NEG if ends[i] else 0.0))
                    for i in nxt]
        parents = [(top[i][1], top[i][2]) for i in nxt]
        self.live = new_live
        # HF's stopping rule, evaluated on the new live beams
        best_len = (self.p.max_tokens if self.p.early_stopping == "never" and lp > 0 else gen_len)
        best_possible = self.live[0][1] / best_len ** lp if self.live else NEG
        if len(self.finished) == k:
            self.improvable = self.improvable and best_possible > min(h.score for h in self.finished)
        all_full = len(self.finished) == k
        self.done = (not self.improvable or (all_full and self.p.early_stopping is True)
                     or all(ends))
        return [] if self.done else parents

    def _offer(self, h: Hypothesis) -> None:
        self.finished.append(h)
        self.finished.sort(key=lambda x: -x.score)
        del self.finished[self.p.beam_width:]

    def best(self) -> list[Hypothesis]:
        return list(self.finished)

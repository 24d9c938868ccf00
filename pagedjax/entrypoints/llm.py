"""``LLM``: the offline library API, vLLM's shape.

    llm = LLM(model="Qwen/Qwen2.5-7B-Instruct", max_model_len=8192)
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=64))
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from pagedjax.core.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagedjax.config import EngineArgs
from pagedjax.engine import LLMEngine
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class EngineStepError(RuntimeError):
    """A device step failed during ``generate``; ``prompts`` are the indices it cost."""

    def __init__(self, message: str, prompts: list[int]):
        super().__init__(f"prompt(s) {prompts}: {message}")
        self.prompts = prompts


class LLM:
    def __init__(self, model: str | None = None, *, loaded=None, **engine_args: Any):
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **engine_args), loaded=loaded)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}), batched
        continuously; outputs come back in the order of the prompts. Every prompt and its
        parameters are checked (all of ``add_request``'s checks) before any is queued, so a bad
        one raises ValueError and nothing runs. A failed device step raises EngineStepError
        naming the prompts it cost; the engine has recovered and serves the next call."""
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        inputs = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
        for i, (p, sp) in enumerate(zip(inputs, params)):
            try:
                self.engine.check_request(p, sp)
            except (ValueError, TypeError) as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [f"gen-{next(self._ids)}" for _ in inputs]
        for rid, p, sp in zip(ids, inputs, params):
            self.engine.add_request(rid, p, sp, stream=False)
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search inside the engine step: beams share KV blocks and fork with copy-on-write.
        Returns, per prompt, the finished hypotheses best first (semantics in beam_search.py)."""
        prompts = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in _as_list(prompts)]
        ids = [f"beam-{next(self._ids)}" for _ in prompts]
        for rid, p in zip(ids, prompts):
            self.engine.add_beam_request(rid, p, params)
        results = []
        for out in self._run(ids, use_tqdm):
            seqs = [BeamSearchSequence(tokens=out.prompt_token_ids + o.token_ids,
                                       cum_logprob=o.cumulative_logprob, score=o.score,
                                       text=o.text, finish_reason=o.finish_reason)
                    for o in out.outputs]
            results.append(BeamSearchOutput(seqs))
        return results

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished():
                outs = self.engine.step()
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                errors = [o for o in outs if o.error is not None]
                if errors:  # the others are aborted below: they would run in the next call
                    raise EngineStepError(errors[0].error,
                                          sorted(ids.index(o.request_id) for o in errors))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts

"""The transformers side of ``native-vs-paged``, run in its own process so that every byte of CUDA
memory it took is gone when it exits (torch and JAX share one GPU in that scenario).

    python -m benchmarks.native_hf SPEC.json RESULT.json

The model is built from the same Hugging Face config dict as pagedjax's, with transformers' own
random initialisation (normal, std = initializer_range) in bf16 directly on the device: the same
shape, not bit-identical weight values (speed and memory do not depend on the values; both sides
generate a fixed number of tokens, greedy, EOS ignored).
``torch.cuda.set_per_process_memory_fraction`` simulates the smaller card. RESULT.json is
rewritten after every case, so a crash or a time-out keeps the cases already measured.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from benchmarks.harness import thin


def _oom_message(e: BaseException) -> bool:
    text = str(e).lower()
    return "out of memory" in text or "alloc_failed" in text


class _Timeline:
    """A transformers streamer: ``put`` is called with the prompt, then once per generated token
    (one decode step); each call records the time and the allocator's bytes in use."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.t0 = time.perf_counter()
        self.points: list[tuple[float, int | None]] = []

    def put(self, value):
        mem = self.torch.cuda.memory_allocated() if self.cuda else None
        self.points.append((time.perf_counter() - self.t0, mem))

    def end(self):
        pass


class Worker:
    def __init__(self, spec: dict):
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch, self.spec = torch, spec
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.result = {"device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "attn_implementation": spec["hf_attn"], "cases": {}}
        self.total = torch.cuda.get_device_properties(0).total_memory if self.cuda else None
        self.result["device_total_bytes"] = self.total
        self.budget = None
        if self.cuda and spec.get("budget_bytes"):
            self.set_budget(spec["budget_bytes"])
        cfg = dict(spec["hf_config"])
        hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        dtype = getattr(torch, spec.get("hf_dtype", "bfloat16"))
        torch.manual_seed(spec.get("seed", 0))
        t0 = time.perf_counter()
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(
                hf_cfg, dtype=dtype, attn_implementation=spec["hf_attn"]).eval()
        self.result["weights_bytes"] = sum(p.numel() * p.element_size()
                                           for p in self.model.parameters())
        self.result["build_s"] = time.perf_counter() - t0
        self.vocab = hf_cfg.vocab_size

    def set_budget(self, budget_bytes: int | None) -> None:
        frac = 1.0 if budget_bytes is None else min(budget_bytes / self.total, 1.0)
        self.torch.cuda.set_per_process_memory_fraction(frac)
        self.budget = budget_bytes

    def generate(self, batch: int, prompt_len: int, new_tokens: int,
                 max_time: float | None = None) -> dict:
        torch = self.torch
        gen = torch.Generator(device="cpu").manual_seed(batch * 100003 + prompt_len)
        ids = torch.randint(2, self.vocab, (batch, prompt_len), generator=gen).to(self.device)
        row = {"batch": batch, "prompt_len": prompt_len, "new_tokens_requested": new_tokens,
               "max_time_s": max_time, "budget_bytes": self.budget}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tl = _Timeline(torch, self.cuda)
        error = None
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    streamer=tl, max_time=max_time)
            if self.cuda:
                torch.cuda.synchronize()
            row["elapsed_s"] = time.perf_counter() - t0
            row["new_tokens"] = int(out.shape[1] - prompt_len)
            del out
        except Exception as e:  # noqa: BLE001 - OOM is a result here, anything else is recorded
            error = e
        row["generated_before_end"] = max(len(tl.points) - 1, 0)  # the first put is the prompt
        if error is not None:
            row["status"] = "OOM" if _oom_message(error) else "error"
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        elif row["new_tokens"] < new_tokens:
            row["status"] = "time-capped"
        else:
            row["status"] = "completed"
        if "elapsed_s" in row:
            row["output_tok_s"] = batch * row["new_tokens"] / row["elapsed_s"]
            if len(tl.points) > 1:
                row["ttft_s"] = tl.points[1][0]
        if self.cuda:
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["timeline"] = thin([{"t": t, "bytes": m} for t, m in tl.points])
        del error, ids, tl
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        rate = f", {row['output_tok_s']:.1f} tok/s" if "output_tok_s" in row else ""
        print(f"[transformers] batch {batch} x {prompt_len} + {new_tokens}: {row['status']}{rate}",
              flush=True)
        return row

    def largest_batch(self, context: int, new_tokens: int, max_batch: int) -> dict:
        """Double the batch until one fails, then bisect: the largest batch that completes."""
        prompt_len = context - new_tokens
        attempts, best, fail, b = [], None, None, 1
        while b <= max_batch:
            r = self.generate(b, prompt_len, new_tokens)
            attempts.append(r)
            if r["status"] != "completed":
                fail = b
                break
            best, b = r, b * 2
        lo = best["batch"] if best else 0
        while fail is not None and fail - lo > 1:
            mid = (lo + fail) // 2
            r = self.generate(mid, prompt_len, new_tokens)
            attempts.append(r)
            if r["status"] == "completed":
                best, lo = r, mid
            else:
                fail = mid
        return {"context": context, "new_tokens": new_tokens, "max_batch": lo,
                "capped": fail is None, "first_failure": fail,
                "failure_status": next((a["status"] for a in attempts if a["batch"] == fail), None),
                "best": best,
                "attempts": [{k: a.get(k) for k in ("batch", "status", "output_tok_s",
                                                    "peak_allocated_bytes", "elapsed_s")}
                             for a in attempts]}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(result_path)
    w = Worker(spec)
    cases, res = spec["cases"], w.result

    def save():
        out.write_text(json.dumps(res, default=float))

    save()
    # (c) first: the speedup target needs it; (a) is time-capped; (b) searches, so it goes last
    if "c" in cases:
        c = cases["c"]
        res["cases"]["c"] = w.generate(c["batch"], c["prompt_len"], c["new_tokens"])
        save()
        if res["cases"]["c"]["status"] != "completed" and w.cuda and spec.get("budget_bytes"):
            # a speedup over an OOM is not a number: give transformers the whole GPU for (c)
            w.set_budget(None)
            res["cases"]["c_whole_gpu"] = w.generate(c["batch"], c["prompt_len"],
                                                     c["new_tokens"])
            w.set_budget(spec["budget_bytes"])
            save()
    if "a" in cases:
        a = cases["a"]
        res["cases"]["a"] = w.generate(1, a["prompt_len"], a["new_tokens"],
                                       spec.get("hf_max_time_a"))
        save()
    if "b" in cases:
        b = cases["b"]
        res["cases"]["b"] = w.largest_batch(b["context"], b["new_tokens"], b["max_batch"])
        save()

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.native_hf SPEC.json RESULT.json")
    main(sys.argv[1], sys.argv[2])

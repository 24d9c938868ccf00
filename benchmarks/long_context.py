"""long-context: what bounded KV costs in quality, on a real model (issue 22): perplexity and
passkey retrieval for full, quantised and windowed KV caches.

Model: the embedded SmolLM2-135M-Instruct (8,192 positions) with bfloat16 weights (``--dtype``;
``--kv-cache-dtype auto`` then stores bfloat16 KV, the baseline), through ``pagedjax.LLM``: the
engine's own scheduler, chunked prefill (``--max-num-batched-tokens``, 2,048 by default), paged
pool and attention. Modes (``MODES``, one engine each; rebuilt per context where the mode's
arguments depend on it): ``bf16`` full KV (the baseline), ``fp8``, ``int8``, ``int4``
(``--kv-cache-dtype``), and ``window``: 64 attention sinks + the last N/4 tokens
(``--kv-sink-tokens 64 --kv-window N/4``, StreamingLLM). A mode whose engine arguments
``EngineArgs`` lacks is reported as "not available" rather than run.

Perplexity at context N: exp of the mean NLL, from the engine's prompt logprobs, of tokens 2 to
N - 1 of ``--ppl-windows`` windows of the text (benchmarks/data/alice29.txt, public domain; see
data/README.md) that start every M = max(contexts) tokens (default 1 window: the start of the
book). Each window is one prompt of M - 1 tokens (the engine keeps one of the model's positions
for the token it generates), and the smaller contexts read their prefix of its logprobs:
attention is causal, so they are the logprobs an N - 1-token prompt gets (the one difference:
int4 scales K per channel over a block, and the block holding token N - 1 may hold later
tokens too). A mode whose engine depends on N (the window) runs a prompt per context.

Passkey at context N and depth d (Landmark Attention / LongLoRA's test): an instruction, the
filler "The grass is green. The sky is blue. ..." repeated to fill N - 8 tokens, a 5-digit key
sentence placed after a fraction d of the filler, and "What is the pass key? The pass key is".
Greedy, 8 new tokens; a trial passes when the first number of the answer is the key. Keys are
drawn from ``--seed``, the same for every mode. A baseline failure means the 135M model itself
cannot retrieve there: the summary lists those cells, and another mode failing there says nothing
about its cache.

Summary: ``ppl_<mode>_<ctx>``, ``passkey_acc_<mode>_<ctx>``, ``<mode>_ppl_delta_pct_<ctx>``
(against the baseline; ctx as 2k, 4k, 8k), the acceptance figures ``int4_ppl_delta_pct_4k``
(target within 3%) and ``window_ppl_delta_pct_8k`` (within 10%), ``baseline_passkey_failures``
and ``modes_not_available``. ``--quick``: contexts 256 and 512 (a smoke run); ``--tiny``: a tiny
random Qwen2 with a character tokenizer (tests/benchmarks/test_long_context_scenario.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import time
from pathlib import Path

import numpy as np

from benchmarks import harness, plots
from benchmarks.common import float_list, int_list, print_table, results_dir, write_result

logger = logging.getLogger(__name__)

TEXT = Path(__file__).parent / "data" / "alice29.txt"
SINK_TOKENS = 64
ANSWER_TOKENS = 8
BASELINE = "bf16"
TARGETS = {"int4_ppl_delta_pct_4k": 3.0, "window_ppl_delta_pct_8k": 10.0}  # issue 22, |delta|

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find "
                       "it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    overrides: dict  # EngineArgs fields; a callable value is given the context length
    note: str

    def engine_overrides(self, context: int) -> dict:
        return {k: v(context) if callable(v) else v for k, v in self.overrides.items()}

    def missing(self) -> list[str]:
        """The EngineArgs fields this mode needs that this engine does not have."""
        from pagedjax.config import EngineArgs

        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        return sorted(set(self.overrides) - fields)


MODES = (
    Mode(BASELINE, {"kv_cache_dtype": "auto"}, "full KV in the model's dtype (the baseline)"),
    Mode("fp8", {"kv_cache_dtype": "fp8"}, "fp8_e4m3, static scales"),
    Mode("int8", {"kv_cache_dtype": "int8"}, "int8, a scale per token and KV head"),
    Mode("int4", {"kv_cache_dtype": "int4"}, "int4, K per channel in a block, V per token"),
    Mode("window", {"kv_cache_dtype": "auto", "kv_sink_tokens": SINK_TOKENS,
                    "kv_window": lambda n: n // 4},
         f"{SINK_TOKENS} sink tokens + the last N/4 (StreamingLLM)"),
)
COLUMNS = ["mode", "context", "ppl", "ppl_delta_pct", "passkey_10", "passkey_50", "passkey_90",
           "passkey_acc", "kv_pool_tokens", "ppl_s", "passkey_s"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pagedjax.config import add_engine_arguments

    add_engine_arguments(p)
    # bfloat16 weights so that "auto" KV is bfloat16, the baseline the GPU runs; the other modes
    # store their own dtype whatever the weights are
    p.set_defaults(dtype="bfloat16")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random Qwen2 with a character tokenizer (the test's plumbing run)")
    p.add_argument("--contexts", type=int_list, default=None,
                   help="comma list (default 2048,4096,8192)")
    p.add_argument("--depths", type=float_list, default=[0.1, 0.5, 0.9],
                   help="passkey depths, fractions of the filler before the key")
    p.add_argument("--passkey-trials", type=int, default=1, help="keys per context and depth")
    p.add_argument("--passkey-contexts", type=int_list, default=None,
                   help="the contexts that run passkey trials (default: all of --contexts)")
    p.add_argument("--ppl-windows", type=int, default=1,
                   help="windows of the text, one every max(contexts) tokens, scored at each context")
    p.add_argument("--modes", default=",".join(m.name for m in MODES),
                   help=f"comma list of {[m.name for m in MODES]}")
    p.add_argument("--text", type=Path, default=TEXT, help="the perplexity text (UTF-8)")
    p.add_argument("--quick", action="store_true", help="contexts 256,512 (a smoke run)")
    p.add_argument("--tag", default="", help="results as long-context-TAG.json/.png")


def label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---- workloads -------------------------------------------------------------------------------
def text_ids(tokenizer, path: Path) -> list[int]:
    return list(tokenizer.encode(path.read_text().replace("\r\n", "\n")))


def passkey_prompt(tokenizer, key: int, depth: float, budget: int) -> list[int]:
    """The longest passkey prompt of at most ``budget`` tokens: whole filler sentences, the key
    after ``depth`` of them. Pieces all start with a space, so their ids concatenate as the
    whole text would tokenize."""
    enc = lambda s: list(tokenizer.encode(s))  # noqa: E731
    head, filler = enc(PASSKEY_INSTRUCTION), enc(PASSKEY_FILLER)
    needle, question = enc(PASSKEY_NEEDLE.format(key=key)), enc(PASSKEY_QUESTION)
    reps = (budget - len(head) - len(needle) - len(question)) // len(filler)
    if reps < 1:
        raise ValueError(f"a passkey prompt needs more than {budget} tokens: raise --contexts")
    before = round(depth * reps)
    return head + filler * before + needle + filler * (reps - before) + question


def answer_ok(text: str, key: int) -> bool:
    m = re.match(r"\s*(\d+)", text)
    return bool(m) and m.group(1) == str(key)


def perplexities(llm, ids: list[int], contexts: list[int], windows: int) -> dict[int, dict]:
    """Perplexity at each of ``contexts`` from one prompt per window of the largest: attention is
    causal, so the first N - 1 logprobs of a longer prompt are those of an N - 1-token prompt."""
    from pagedjax import SamplingParams

    top = max(contexts)
    if windows * top > len(ids):
        raise ValueError(f"--ppl-windows {windows} x context {top} needs {windows * top} tokens; "
                         f"the text has {len(ids)}: lower one of them")
    prompts = [ids[i * top:i * top + top - 1] for i in range(windows)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    # nll[w, i]: of token i + 1 of window w
    nll = np.array([[-lps[t] for t, lps in zip(p[1:], o.prompt_logprobs[1:])]
                    for p, o in zip(prompts, outs)])
    out = {}
    for n in contexts:
        mean = float(nll[:, :n - 2].mean())
        out[n] = {"ppl": math.exp(mean), "nll": mean, "tokens_scored": nll[:, :n - 2].size}
    return out


def passkey(llm, tokenizer, n: int, trials: list[tuple[float, int]]) -> list[dict]:
    from pagedjax import SamplingParams

    prompts = [passkey_prompt(tokenizer, key, depth, n - ANSWER_TOKENS) for depth, key in trials]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS),
                        use_tqdm=False)
    return [{"depth": d, "key": k, "prompt_len": len(p), "answer": o.outputs[0].text,
             "ok": answer_ok(o.outputs[0].text, k)}
            for (d, k), p, o in zip(trials, prompts, outs)]


# ---- the run ---------------------------------------------------------------------------------
def _run_mode(mode: Mode, loaded, ids, keys, args, rows: list[dict], done) -> None:
    """Append the mode's rows, calling ``done()`` after each (a run cut short keeps them)."""
    engines = {}  # the mode's engine arguments -> the contexts they serve (window: one each)
    for n in args.contexts:
        engines.setdefault(tuple(mode.engine_overrides(n).items()), []).append(n)
    for overrides, contexts in engines.items():
        llm = harness.make_llm(loaded, harness.engine_args(args, **dict(overrides)))
        t0 = time.perf_counter()
        ppl = perplexities(llm, ids, contexts, args.ppl_windows)
        ppl_s = time.perf_counter() - t0
        logger.info("%s: perplexity at %s in %.0f s: %s", mode.name, contexts, ppl_s,
                    ", ".join(f"{ppl[n]['ppl']:.3f}" for n in contexts))
        for n in contexts:
            t0 = time.perf_counter()
            trials = passkey(llm, loaded.tokenizer, n, keys[n]) if n in args.passkey_contexts else []
            passkey_s = time.perf_counter() - t0 if trials else None
            bm = llm.engine.block_manager
            rows.append({"mode": mode.name, "context": n, **ppl[n], "passkey": trials,
                         "passkey_acc": float(np.mean([t["ok"] for t in trials])) if trials else None,
                         "ppl_s": ppl_s, "passkey_s": passkey_s,
                         "kv_pool_tokens": bm.num_blocks * bm.block_size, "engine": dict(overrides)})
            if trials:
                logger.info("%s at %d: passkey %d/%d (%.0f s)", mode.name, n,
                            sum(t["ok"] for t in trials), len(trials), passkey_s)
            done()
        harness.release(llm)


def _depth_cells(row: dict, depths: list[float]) -> dict:
    cells = {}
    for d in depths:
        ok = [t["ok"] for t in row["passkey"] if t["depth"] == d]
        cells[f"passkey_{round(100 * d)}"] = f"{sum(ok)}/{len(ok)}" if ok else None
    return cells


def summarize(rows: list[dict], skipped: dict, args) -> tuple[dict, list[dict]]:
    base = {r["context"]: r for r in rows if r["mode"] == BASELINE}
    summary, table = {}, []
    for r in rows:
        c, b = label(r["context"]), base.get(r["context"])
        delta = 100 * (r["ppl"] / b["ppl"] - 1) if b is not None else None
        r["ppl_delta_pct"] = delta
        summary[f"ppl_{r['mode']}_{c}"] = r["ppl"]
        summary[f"passkey_acc_{r['mode']}_{c}"] = r["passkey_acc"]
        if r["mode"] != BASELINE:
            summary[f"{r['mode']}_ppl_delta_pct_{c}"] = delta
        table.append({**{k: r[k] for k in ("mode", "context", "ppl", "ppl_delta_pct",
                                            "passkey_acc", "kv_pool_tokens", "ppl_s",
                                            "passkey_s")},
                      **_depth_cells(r, args.depths)})
    for key, target in TARGETS.items():
        summary.setdefault(key, None)
        value = summary[key]
        summary[key.replace("ppl_delta_pct", "within_target")] = (
            None if value is None else abs(value) <= target)
    summary["baseline_passkey_failures"] = [
        f"{label(r['context'])}@{round(100 * t['depth'])}%" for r in base.values()
        for t in r["passkey"] if not t["ok"]]
    for m in {r["mode"] for r in rows}:
        trials = [t["ok"] for r in rows if r["mode"] == m for t in r["passkey"]]
        summary[f"passkey_acc_{m}"] = float(np.mean(trials)) if trials else None
    summary["modes_not_available"] = skipped
    summary["contexts"] = args.contexts
    summary["passkey_trials_per_depth"] = args.passkey_trials
    return summary, table


def run(args) -> dict:
    if args.contexts is None:
        args.contexts = [256, 512] if args.quick else [2048, 4096, 8192]
    if args.passkey_trials < 1 or args.ppl_windows < 1:
        raise ValueError("--passkey-trials and --ppl-windows must be >= 1")
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError(f"--depths {args.depths}: each must be a fraction in [0, 1]")
    if args.passkey_contexts is None:
        args.passkey_contexts = args.contexts
    if not set(args.passkey_contexts) <= set(args.contexts):
        raise ValueError(f"--passkey-contexts {args.passkey_contexts} must be among --contexts "
                         f"{args.contexts}")
    if args.max_model_len is None:
        args.max_model_len = max(args.contexts)
    names = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(names) - {m.name for m in MODES})
    if unknown:
        raise ValueError(f"--modes {unknown} unknown; choose from {[m.name for m in MODES]}")
    modes = [next(m for m in MODES if m.name == name) for name in names]  # in the order given
    skipped = {m.name: f"not available: EngineArgs has no {', '.join(m.missing())}"
               for m in modes if m.missing()}
    loaded = harness.load(args)
    if args.tiny:
        loaded = dataclasses.replace(loaded, tokenizer=harness.char_tokenizer(loaded.cfg.vocab_size))
    if loaded.tokenizer is None:
        raise ValueError("long-context needs a model with a tokenizer (real text and passkey "
                         "prompts): drop --load-format dummy")
    ids = text_ids(loaded.tokenizer, args.text)
    rng = np.random.default_rng(args.seed)  # the same keys for every mode
    keys = {n: [(d, int(rng.integers(10_000, 100_000))) for d in args.depths
                for _ in range(args.passkey_trials)] for n in args.contexts}
    rows = []

    def done():
        _write(*summarize(rows, skipped, args), rows, modes, loaded, ids, args)

    for mode in modes:
        if mode.name in skipped:
            logger.warning("%s: %s", mode.name, skipped[mode.name])
            continue
        _run_mode(mode, loaded, ids, keys, args, rows, done)
    summary, table = summarize(rows, skipped, args)
    _write(summary, table, rows, modes, loaded, ids, args)
    print_table(table, COLUMNS)
    for name, why in skipped.items():
        print(f"{name}: {why}")
    fails = summary["baseline_passkey_failures"]
    print("passkey: the baseline (bf16, full KV) "
          + (f"fails at {', '.join(fails)}: SmolLM2-135M itself cannot retrieve there, so "
             "another mode's failure there says nothing about its cache" if fails
             else "retrieves every key"))
    if any(r["mode"] == "window" and r["passkey"] for r in rows):
        print("window: a key is inside the last N/4 tokens only at depths past 75% (the window "
              "drops the rest by design; the sinks hold the instruction, not the key)")
    for key, target in TARGETS.items():
        v = summary[key]
        print(f"{key}: " + ("not measured" if v is None else
                            f"{v:+.2f}% (target within {target:g}%: "
                            f"{'met' if abs(v) <= target else 'MISSED'})"))
    return summary


def _write(summary, table, rows, modes, loaded, ids, args) -> None:
    figures = {"model": loaded.cfg.name or "SmolLM2-135M-Instruct", "dtype": loaded.dtype,
               "text": {"path": str(args.text.name), "tokens": len(ids),
                        "windows": args.ppl_windows,
                        "scored": "tokens 2 to N - 1 of each window; a window every "
                                  "max(contexts) tokens, one prompt of max(contexts) - 1 tokens"},
               "passkey": {"depths": args.depths, "trials_per_depth": args.passkey_trials,
                           "answer_tokens": ANSWER_TOKENS, "filler": PASSKEY_FILLER.strip()},
               "modes": {m.name: {"note": m.note, "overrides": {
                   k: ("N/4" if callable(v) else v) for k, v in m.overrides.items()}}
                         for m in modes},
               "engine": {"max_model_len": args.max_model_len, "block_size": args.block_size,
                          "max_num_batched_tokens": args.max_num_batched_tokens,
                          "attention_backend": args.attention_backend},
               "rows": rows, "table": {"columns": COLUMNS, "rows": table},
               "targets": TARGETS}
    name = "long-context" + (f"-{args.tag}" if args.tag else "")
    _plot(results_dir(args.out) / f"{name}.png", rows, modes, args)
    write_result("long-context", summary, figures, out=args.out, tag=args.tag)


def _plot(path, rows: list[dict], modes: list[Mode], args) -> None:
    names = [m.name for m in modes if any(r["mode"] == m.name for r in rows)]
    cols = [f"{label(n)}@{round(100 * d)}%" for n in args.passkey_contexts for d in args.depths]
    grid = [[float(np.mean([t["ok"] for r in rows if r["mode"] == m and r["context"] == n
                            for t in r["passkey"] if t["depth"] == d] or [np.nan]))
             for n in args.passkey_contexts for d in args.depths] for m in names]
    plots.save(path, [
        {"kind": "lines", "title": "perplexity of alice29.txt by context", "xlabel": "context (tokens)",
         "ylabel": "perplexity", "series": {
             m: ([r["context"] for r in rows if r["mode"] == m],
                 [r["ppl"] for r in rows if r["mode"] == m]) for m in names}},
        {"kind": "grid", "title": "passkey accuracy (context @ depth)", "rows": names,
         "cols": cols, "values": grid, "vmin": 0.0, "vmax": 1.0},
    ], title="long-context: SmolLM2-135M, KV cache modes")

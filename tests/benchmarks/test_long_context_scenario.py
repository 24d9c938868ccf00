"""The long-context scenario end to end on the CPU (``--quick --tiny``: a tiny random Qwen2 with
a character tokenizer, at contexts 512 and 1024 since a character a token makes the passkey
prompt's instruction alone 150 tokens; passkey at 512 only, which saves compiles), and its
passkey prompts built to the letter.

The tiny model says nothing about quality (SmolLM2's numbers are the committed full run); what
must hold is the plumbing: every available mode measured at every context, perplexities that
are the engine's own prompt logprobs over the documented tokens, deltas against the baseline,
quantised pools holding more tokens than the baseline's, and the window mode either measured
or reported by name as not available."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks import harness, long_context
from benchmarks.__main__ import main
from pagedjax.config import EngineArgs

CONTEXTS = (512, 1024)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("long-context")
    summary = main(["long-context", "--out", str(out), "--quick", "--tiny", "--contexts",
                    ",".join(map(str, CONTEXTS)), "--passkey-contexts", str(CONTEXTS[0]),
                    "--kv-cache-memory-bytes", str(4 << 20)])
    return summary, json.loads((out / "long-context.json").read_text()), out


def test_every_mode_at_every_context(quick):
    summary, record, out = quick
    assert record["summary"] == json.loads(json.dumps(summary, default=float))
    assert record["device"].startswith("cpu") and "long-context" in record["command"]
    rows = record["figures"]["rows"]
    window = {"kv_sink_tokens", "kv_window"} <= {f.name for f in dataclasses.fields(EngineArgs)}
    measured = ["bf16", "fp8", "int8", "int4"] + (["window"] if window else [])
    assert [(r["mode"], r["context"]) for r in rows] == [(m, n) for m in measured for n in CONTEXTS]
    if window:
        assert [r["engine"]["kv_window"] for r in rows if r["mode"] == "window"] == [128, 256]
        assert summary["modes_not_available"] == {}
    else:
        assert "kv_window" in summary["modes_not_available"]["window"]
        assert summary["window_ppl_delta_pct_8k"] is None
    assert summary["int4_ppl_delta_pct_4k"] is None  # 4K is not a quick context
    assert (out / "long-context.png").exists()


def test_perplexity_and_deltas(quick):
    summary, record, _ = quick
    rows = {(r["mode"], r["context"]): r for r in record["figures"]["rows"]}
    for (mode, n), r in rows.items():
        assert r["tokens_scored"] == n - 2  # a prompt of n - 1 tokens, the first unpredicted
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
        # a random model over a 512-token vocabulary: near-uniform, far from certain
        assert 50 < r["ppl"] < 2000
        assert summary[f"ppl_{mode}_{long_context.label(n)}"] == r["ppl"]
        if mode != "bf16":
            base = rows[("bf16", n)]["ppl"]
            assert summary[f"{mode}_ppl_delta_pct_{long_context.label(n)}"] == pytest.approx(
                100 * (r["ppl"] / base - 1))
    # the same pool bytes hold more tokens the fewer bits a value takes
    tokens = {m: rows[(m, CONTEXTS[0])]["kv_pool_tokens"] for m in ("bf16", "int8", "fp8", "int4")}
    assert tokens["bf16"] < tokens["int8"] <= tokens["fp8"] < tokens["int4"]


def test_passkey_figures_add_up(quick):
    summary, record, _ = quick
    rows = record["figures"]["rows"]
    filler = len(harness.char_tokenizer(512).encode(long_context.PASSKEY_FILLER))
    failures = []
    for r in rows:
        if r["context"] != CONTEXTS[0]:  # --passkey-contexts: the first only
            assert r["passkey"] == [] and r["passkey_acc"] is None
            continue
        assert [t["depth"] for t in r["passkey"]] == [0.1, 0.5, 0.9]
        for t in r["passkey"]:
            assert t["ok"] == long_context.answer_ok(t["answer"], t["key"])
            assert r["context"] - 8 - filler < t["prompt_len"] <= r["context"] - 8
            if r["mode"] == "bf16" and not t["ok"]:
                failures.append(f"{long_context.label(r['context'])}@{round(100 * t['depth'])}%")
        assert r["passkey_acc"] == sum(t["ok"] for t in r["passkey"]) / 3
    assert summary["baseline_passkey_failures"] == failures
    # every mode was asked for the same keys
    keys = {(r["context"], t["depth"]): t["key"] for r in rows if r["mode"] == "bf16"
            for t in r["passkey"]}
    assert all(keys[(r["context"], t["depth"])] == t["key"] for r in rows for t in r["passkey"])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_places_the_key_at_its_depth(depth):
    tok = harness.char_tokenizer(512)
    enc = lambda s: list(tok.encode(s))  # noqa: E731
    filler, budget = enc(long_context.PASSKEY_FILLER), 1000
    ids = long_context.passkey_prompt(tok, 12345, depth, budget)
    assert budget - len(filler) < len(ids) <= budget
    text = tok.decode(ids)
    assert text.startswith(long_context.PASSKEY_INSTRUCTION)
    assert text.endswith(long_context.PASSKEY_QUESTION)
    before, after = text.split(long_context.PASSKEY_NEEDLE.format(key=12345))
    n_before = before.count(long_context.PASSKEY_FILLER)
    n_after = after.count(long_context.PASSKEY_FILLER)
    assert n_before == round(depth * (n_before + n_after))


def test_passkey_prompt_too_small_is_refused():
    with pytest.raises(ValueError, match="raise --contexts"):
        long_context.passkey_prompt(harness.char_tokenizer(512), 12345, 0.5, 100)


@pytest.mark.parametrize("text,ok", [(" 12345.", True), ("12345 is", True), (" 123456", False),
                                     (" 1234", False), (" The key is 12345", False), ("", False)])
def test_answer_exact_match(text, ok):
    assert long_context.answer_ok(text, 12345) == ok

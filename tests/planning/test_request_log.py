"""Request logs (`pagedjax plan --requests`): lengths, percentiles, chat growth, malformed
lines."""
from __future__ import annotations

import json

from pagedjax.worker import kv_pool
from pagedjax.planning import planner, model_source

from tests.planning.conftest import QWEN25_7B, write_config, run_plan, write_log, planner_args


def test_request_log_percentiles_and_malformed_lines(tmp_path, tokenizer_dir):
    from pagedjax.planning import request_log

    tok = model_source.load_tokenizer(str(tokenizer_dir))
    prompts, errors = request_log.read_request_log(write_log(tmp_path / "log.jsonl"), tok)
    assert len(prompts) == 100
    assert [e["line"] for e in errors] == [3, 7]
    assert "not valid JSON" in errors[0]["error"] and "neither" in errors[1]["error"]
    shape = kv_pool.KVPoolSpec(num_layers=1, num_blocks=0, block_size=8, num_kv_heads=1,
                               head_dim=8)
    s = request_log.summarize(prompts, errors, max_tokens=5, spec=shape, model_max_len=4096)
    assert (s["prompt_tokens"]["p50"], s["prompt_tokens"]["p95"],
            s["prompt_tokens"]["p99"]) == (50, 95, 99)
    assert s["recommended_max_model_len"] == 104  # 99 + 5, already a multiple of 8
    assert s["rejected"] == 1 and s["rejected_share"] == 0.01  # the 100-token prompt
    assert s["requested_max_tokens"]["p50"] == 8
    capped = request_log.summarize(prompts, [], max_tokens=5, spec=shape, model_max_len=64)
    assert capped["recommended_max_model_len"] == 64 and capped["capped_at_model_max"]


def test_multi_turn_chat_history_growth(tmp_path, tokenizer_dir):
    def chat(turns):
        msgs = []
        for _ in range(turns):
            msgs += [{"role": "user", "content": "a a a"}, {"role": "assistant", "content": "b b"}]
        return {"messages": msgs[:-1]}

    log = tmp_path / "chat.jsonl"
    log.write_text("\n".join(json.dumps(chat(t)) for t in (1, 1, 2, 3, 3)) + "\n")
    q = planner.plan(planner_args(model=str(write_config(tmp_path / "m", QWEN25_7B)),
                                  requests=str(log), tokenizer=str(tokenizer_dir)))["requests"]
    # user turn: 1 + 3 tokens, assistant turn: 1 + 2, generation prompt: 1.
    rows = q["by_user_turns"]
    assert [(r["user_turns"], r["requests"], r["mean"]) for r in rows] == [
        (1, 2, 5), (2, 1, 12), (3, 2, 19)]
    assert [r["growth_vs_previous"] for r in rows] == [None, 7, 7]



def test_readme_requests_example_with_token_counts(capsys, tmp_path):
    """The README's line, as written: a log that carries token counts needs no tokenizer."""
    log = tmp_path / "log.jsonl"
    lines = [{"prompt_tokens": n, "max_tokens": 64} for n in range(1, 101)]
    lines += [{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}, {"prompt_tokens": 0}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = json.loads(run_plan(capsys, "--model", "Qwen2.5-7B-Instruct", "--gpu-memory", "24GiB",
                            "--requests", log, "--max-tokens", 512, "--json"))
    q = r["requests"]
    assert q["requests"] == 101 and q["prompt_tokens"]["p99"] == 99
    assert q["recommended_max_model_len"] == 624  # 99 + 512, rounded up to 16
    assert [e["line"] for e in q["malformed_lines"]] == [102]
    assert "positive integer" in q["malformed_lines"][0]["error"]
    out = run_plan(capsys, "--model", "Qwen2.5-7B-Instruct", "--gpu-memory", "24GiB",
                   "--requests", log, "--max-tokens", 512)
    assert "recommended --max-model-len 624" in out

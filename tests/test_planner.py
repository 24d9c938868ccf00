"""``pagedjax plan`` and the memory arithmetic the engine shares with it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagedjax import cli, kv_pool, planner
from pagedjax import memory_report as mr
from pagedjax.config import EngineArgs
from pagedjax.kernels.reference import SCRATCH_BYTES
from pagedjax.kv_pool import GiB
from pagedjax.models import ModelConfig

QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
              "torch_dtype": "float16"}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def write_config(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.fixture
def qwen_dir(tmp_path):
    return write_config(tmp_path / "Qwen2.5-7B-Instruct", QWEN25_7B)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A whitespace word-level tokenizer: one token per word, so expected lengths are obvious."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a", "b", "user", "assistant", "system"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def run_plan(capsys, *argv) -> str:
    assert cli.main(["plan", *map(str, argv)]) is None
    return capsys.readouterr().out


def plan_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", *map(str, argv)])
    return str(e.value.code)


# ---- arithmetic ------------------------------------------------------------------------------
def test_kv_bytes_per_token_bf16():
    qwen, llama = ModelConfig.from_hf(QWEN25_7B), ModelConfig.from_hf(LLAMA2_70B)
    assert mr.kv_bytes_per_token(qwen, "bfloat16") == 57_344
    assert mr.kv_bytes_per_token(llama, "bfloat16") == 327_680
    assert mr.kv_bytes_per_token(llama, "bfloat16", tp=8) == 327_680 // 8
    # 16 devices, 8 KV heads: each device still stores one whole head (replication).
    assert mr.kv_heads_per_device(llama, 16) == 1
    assert mr.kv_bytes_per_token(llama, "bfloat16", tp=16) == 327_680 // 8


def test_weights_per_device_shard_everything_but_norms():
    cfg = ModelConfig.from_hf(QWEN25_7B)
    one = mr.weights_bytes(cfg, "bfloat16")
    assert one == cfg.num_params() * 2
    assert abs(one / 1e9 - 15.2) < 0.1  # ANCHORS: 7.6 B parameters = 15.2 GB
    replicated_norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 2
    assert 2 * mr.weights_bytes(cfg, "bfloat16", tp=2) - one == replicated_norms


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="must divide the number of attention heads"):
        mr.per_device_config(ModelConfig.from_hf(QWEN25_7B), 8)


@settings(max_examples=50, deadline=None)
@given(budget=st.integers(0, 1 << 36), block_size=st.sampled_from([8, 16, 32]),
       dtype=st.sampled_from(["bfloat16", "float32"]))
def test_plan_pool_is_the_engines_num_blocks_for_budget(budget, block_size, dtype):
    cfg = ModelConfig.from_hf(QWEN25_7B)
    spec = mr.plan_pool(cfg, budget, block_size, dtype)
    assert spec.num_blocks == kv_pool.num_blocks_for_budget(budget, cfg, block_size, dtype)
    assert spec.total_bytes <= budget < spec.total_bytes + spec.bytes_per_block


def test_planner_pool_equals_the_engines_actual_pool_on_cpu(tiny_qwen):
    from pagedjax.engine import LLMEngine

    args = EngineArgs(kv_cache_memory_bytes=3_000_000, max_model_len=256, block_size=16)
    engine = LLMEngine(args, loaded=tiny_qwen)
    rep = mr.memory_report(tiny_qwen.cfg, args, tiny_qwen.dtype)
    assert rep["num_blocks"] == engine.spec.num_blocks > 0
    assert rep["kv_pool_gib"] * GiB == engine.spec.total_bytes
    assert mr.plan_pool(tiny_qwen.cfg, 3_000_000, 16, tiny_qwen.dtype) == engine.spec


def test_memory_report_splits_the_device():
    cfg, total = ModelConfig.from_hf(QWEN25_7B), 80 * GiB
    rep = mr.memory_report(cfg, EngineArgs(), "bfloat16", total_bytes=total)
    b = rep["bytes"]
    assert b["weights"] + b["profile_peak"] + b["kv_pool"] + b["free"] == total
    budget = int(total * 0.9) - b["weights"] - b["profile_peak"]
    assert b["kv_pool"] <= budget < b["kv_pool"] + rep["block_bytes"]
    assert rep["profile_peak_source"] == "estimate"
    measured = mr.memory_report(cfg, EngineArgs(), "bfloat16", total_bytes=total,
                                weights=15 * GiB, profile_peak=2 * GiB)
    assert measured["profile_peak_source"] == "measured" and measured["weights_gib"] == 15


def test_profile_peak_estimate_formula():
    cfg = ModelConfig.from_hf(QWEN25_7B)
    t, s = 2048, 256
    layer = t * (2 * 3584 + (28 + 8) * 128 + 3 * 18944) * 2
    assert mr.profile_peak_bytes_estimate(cfg, t, "bfloat16", s) == (
        layer + 2 * s * 152064 * 4 + SCRATCH_BYTES)


def test_min_device_bytes_is_the_smallest_that_fits():
    cfg, args = ModelConfig.from_hf(QWEN25_7B), EngineArgs()
    w, p = mr.weights_bytes(cfg, "bfloat16"), 1 * GiB
    need = mr.min_device_bytes(cfg, args, "bfloat16", 64, 32768, w, p)

    def conc(total):
        return mr.max_concurrency(mr.plan_pool(cfg, int(total * 0.9) - w - p, 16, "bfloat16"),
                                  32768)

    assert conc(need) >= 64 > conc(need - 1)


def test_parse_size():
    assert mr.parse_size("80GiB") == mr.parse_size("81920MiB") == 80 * GiB
    assert mr.parse_size("24GB") == 24 * 10**9
    assert mr.parse_size("1.5 gib") == int(1.5 * GiB)
    with pytest.raises(ValueError, match="80GiB, 24GB or 81920MiB"):
        mr.parse_size("80")


# ---- model resolution ------------------------------------------------------------------------
def test_unknown_model_and_offline_hub_give_clear_errors(capsys, monkeypatch):
    msg = plan_error(capsys, "--model", "no-such-model", "--gpu-memory", "80GiB")
    assert "unknown model" in msg and "shipped" in msg

    def offline(repo_id):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(planner, "_hub_config_path", offline)
    msg = plan_error(capsys, "--model", "nobody/NoSuchModel")
    assert "could not be fetched from the Hugging Face hub" in msg and "network" in msg


def test_shipped_configs_resolve_offline():
    res = planner.resolve_model("Qwen/Qwen2.5-7B-Instruct")  # a hub id whose config is shipped
    assert res.kind == "shipped config" and res.tokenizer == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert mr.kv_bytes_per_token(res.cfg, "bfloat16") == 57_344
    llama = planner.resolve_model("llama-2-70b-hf").cfg
    assert mr.kv_bytes_per_token(llama, "bfloat16") == 327_680
    assert planner.resolve_dtype("auto") == "bfloat16"


def test_weights_are_what_the_loader_allocates():
    from pagedjax.models.params import param_shapes

    for cfg in (ModelConfig.from_hf(QWEN25_7B), ModelConfig.from_hf(LLAMA2_70B)):
        assert sum(int(np.prod(s)) for s in param_shapes(cfg).values()) == cfg.num_params()


def test_gguf_metadata(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(128)
    w.add_context_length(2048)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(96)])
    w.add_tensor("token_embd.weight", np.zeros((96, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = planner.resolve_model(str(path))
    cfg = res.cfg
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings) == (2, 64, 4, 2, 16, 128, 96, 2048)
    assert cfg.tie_word_embeddings  # no output.weight tensor
    assert res.gguf_tensor_bytes == 96 * 64 * 2
    assert res.tokenizer == (str(tmp_path), "tiny.gguf")


# ---- request logs ----------------------------------------------------------------------------
def write_log(path: Path) -> Path:
    lines = [json.dumps({"prompt": " ".join(["a"] * n), "max_tokens": 8}) for n in range(1, 101)]
    lines.insert(2, "{not json")  # line 3
    lines.insert(6, json.dumps({"model": "x"}))  # line 7: neither prompt nor messages
    path.write_text("\n".join(lines) + "\n")
    return path


def test_request_log_percentiles_and_malformed_lines(tmp_path, tokenizer_dir):
    from pagedjax import request_log

    tok = planner.load_tokenizer(str(tokenizer_dir))
    prompts, errors = request_log.read_request_log(write_log(tmp_path / "log.jsonl"), tok)
    assert len(prompts) == 100
    assert [e["line"] for e in errors] == [3, 7]
    assert "not valid JSON" in errors[0]["error"] and "neither" in errors[1]["error"]
    s = request_log.summarize(prompts, errors, max_tokens=5, block_size=8, model_max_len=4096)
    assert (s["prompt_tokens"]["p50"], s["prompt_tokens"]["p95"],
            s["prompt_tokens"]["p99"]) == (50, 95, 99)
    assert s["recommended_max_model_len"] == 104  # 99 + 5, already a multiple of 8
    assert s["rejected"] == 1 and s["rejected_share"] == 0.01  # the 100-token prompt
    assert s["requested_max_tokens"]["p50"] == 8
    capped = request_log.summarize(prompts, [], max_tokens=5, block_size=8, model_max_len=64)
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


def planner_args(**kw):
    import argparse

    p = argparse.ArgumentParser()
    planner.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


# ---- the command -----------------------------------------------------------------------------
def test_cli_json_end_to_end(capsys, qwen_dir, tmp_path, tokenizer_dir):
    log = write_log(tmp_path / "log.jsonl")
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--json",
                            "--requests", log, "--tokenizer", tokenizer_dir, "--max-tokens", 512,
                            "--target-concurrency", 8, "--max-model-len", 8192))
    assert r["kv_bytes_per_token"] == 57_344 and r["dtype"] == "bfloat16"
    mem = r["memory"]
    spec = mr.plan_pool(ModelConfig.from_hf(QWEN25_7B), 0, 16, "bfloat16")
    assert mem["num_blocks"] * spec.bytes_per_block == mem["bytes"]["kv_pool"]
    lens = [row["max_model_len"] for row in r["concurrency"]]
    assert lens == [2048, 4096, 8192, 16384, 32768]
    for row in r["concurrency"]:
        assert row["max_concurrency"] == mem["num_blocks"] // (row["max_model_len"] // 16)
    assert r["target"]["min_device_memory_gib"] < 80
    q = r["requests"]
    assert q["recommended_max_model_len"] == 624  # 99 + 512 -> 611, rounded up to 16
    assert q["max_concurrency"] == mem["num_blocks"] // (624 // 16)
    assert [e["line"] for e in q["malformed_lines"]] == [3, 7]


def test_human_table(capsys, qwen_dir, tmp_path, tokenizer_dir):
    out = run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--requests",
                   write_log(tmp_path / "log.jsonl"), "--tokenizer", tokenizer_dir)
    assert "57,344 B per token" in out and "32,768 (model max)" in out
    assert "P50 50  P95 95  P99 99" in out and "line 3: not valid JSON" in out


def test_budget_smaller_than_weights(capsys, qwen_dir):
    msg = plan_error(capsys, "--model", qwen_dir, "--gpu-memory", "12GiB")
    assert "smaller than the weights" in msg and "--tensor-parallel-size" in msg


def test_bad_inputs(capsys, qwen_dir, tmp_path):
    assert "reports no memory limit" in plan_error(capsys, "--model", qwen_dir, "--device")
    assert "needs a tokenizer" in plan_error(
        capsys, "--model", qwen_dir / "config.json", "--requests", write_log(tmp_path / "l"))
    assert "larger than the model's maximum" in plan_error(
        capsys, "--model", qwen_dir, "--max-model-len", 65536)
    with pytest.raises(SystemExit):  # argparse: bad size
        cli.main(["plan", "--model", str(qwen_dir), "--gpu-memory", "80"])
    assert "81920MiB" in capsys.readouterr().err


def test_tensor_parallel_replication_is_reported(capsys, tmp_path):
    llama = write_config(tmp_path / "llama70b", LLAMA2_70B)
    r = json.loads(run_plan(capsys, "--model", llama, "--gpu-memory", "80GiB",
                            "--tensor-parallel-size", 16, "--json"))
    assert r["kv_heads_per_device"] == 1 and r["kv_heads_replicated"]
    assert any("replicated" in n for n in r["notes"])
    assert [row["max_model_len"] for row in r["concurrency"]] == [2048, 4096]

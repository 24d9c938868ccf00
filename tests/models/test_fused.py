"""Fused q/k/v and gate/up projections (pagedjax/models/fused.py): the layout is the documented one,
it splits back into the originals exactly, the model computes the same logits with it (dense and
paged), the fp8 KV scales do not change, tensor parallelism gives device i block i, and it is what
the engine runs."""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM
from pagedjax.models import forward_dense
from pagedjax.models.fused import fuse_projections, gate_up_parts, qkv_parts
from pagedjax.models.kv_scales import layer_kv_scales
from pagedjax.worker.sharding import TensorParallel
from tests.conftest import TINY_QWEN, TinyModel, random_params
from tests.models.paged_step import prefill_one_sequence


def _cfg(n, k, bias=True, f=128):
    return dataclasses.replace(TINY_QWEN, num_attention_heads=n, num_key_value_heads=k,
                               attention_bias=bias, intermediate_size=f)


def _host(params):
    return jax.tree.map(np.asarray, params)


def _expected_blocks(parts, r):
    """The documented layout built by hand: block i = the i-th slice of each part, in order."""
    return np.stack([np.concatenate([np.split(p, r)[i] for p in parts]) for i in range(r)])


CASES = [(8, 2, 1), (8, 2, 2), (8, 4, 4), (4, 4, 1), (4, 4, 2), (4, 4, 4)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,k,r", CASES)
def test_layout_and_exact_round_trip(n, k, r, bias):
    cfg = _cfg(n, k, bias)
    params = random_params(cfg, seed=n + k + r)
    orig = _host(params)
    layer0 = params["model"]["layers"][0]
    o_proj, old_q = layer0["self_attn"]["o_proj"], layer0["self_attn"]["q_proj"]["weight"]
    fused = fuse_projections(cfg, params, r)
    # a new tree: the caller's is untouched, leaves that do not change are shared
    assert sorted(layer0["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not old_q.is_deleted()
    assert fused["model"]["layers"][0]["self_attn"]["o_proj"] is o_proj
    consumed = fuse_projections(cfg, random_params(cfg, seed=n + k + r), r, consume=True)
    for got, want in zip(jax.tree.leaves(consumed), jax.tree.leaves(fused)):
        np.testing.assert_array_equal(got, want)
    for layer, want in zip(fused["model"]["layers"], orig["model"]["layers"]):
        attn, mlp = layer["self_attn"], layer["mlp"]
        assert sorted(attn) == ["o_proj", "qkv_proj"] and sorted(mlp) == ["down_proj",
                                                                          "gate_up_proj"]
        qkv = attn["qkv_proj"]
        assert qkv["weight"].shape == (r, (n // r + 2 * k // r) * cfg.head_dim, cfg.hidden_size)
        assert mlp["gate_up_proj"]["weight"].shape == (r, 2 * cfg.intermediate_size // r,
                                                       cfg.hidden_size)
        for key in ("weight", "bias") if bias else ("weight",):
            np.testing.assert_array_equal(qkv[key], _expected_blocks(
                [want["self_attn"][p][key] for p in ("q_proj", "k_proj", "v_proj")], r))
        assert ("bias" in qkv) == bias
        np.testing.assert_array_equal(mlp["gate_up_proj"]["weight"], _expected_blocks(
            [want["mlp"][p]["weight"] for p in ("gate_proj", "up_proj")], r))
        # split back: exactly the originals
        parts = {**qkv_parts(cfg, attn), **gate_up_parts(mlp)}
        want_parts = {p: want[m][p] for m, ps in (("self_attn", ("q_proj", "k_proj", "v_proj")),
                                                  ("mlp", ("gate_proj", "up_proj"))) for p in ps}
        assert jax.tree.structure(parts) == jax.tree.structure(want_parts)
        for got, ref in zip(jax.tree.leaves(parts), jax.tree.leaves(want_parts)):
            np.testing.assert_array_equal(got, ref)


def test_relayout_for_other_shards_and_unsplittable_left_unfused(caplog):
    """An already fused tree laid out again for another shard count equals a direct fuse; where
    the KV heads (2 into 4) or MLP columns (90 into 4) do not split, those stay unfused."""
    cfg = _cfg(8, 2, f=90)
    params, direct = random_params(cfg, seed=3), random_params(cfg, seed=3)
    orig = _host(params)
    params = fuse_projections(cfg, params, 2)
    with caplog.at_level(logging.INFO, logger="pagedjax.models.fused"):
        params = fuse_projections(cfg, params, 4)
    assert "q/k/v projections left unfused" in caplog.text
    assert "gate/up projections left unfused" in caplog.text
    layer = params["model"]["layers"][0]
    assert "qkv_proj" not in layer["self_attn"] and "gate_up_proj" not in layer["mlp"]
    np.testing.assert_array_equal(layer["self_attn"]["k_proj"]["weight"],
                                  orig["model"]["layers"][0]["self_attn"]["k_proj"]["weight"])
    params, direct = fuse_projections(cfg, params, 1), fuse_projections(cfg, direct, 1)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("n,k,bias", [(8, 4, True), (4, 4, False)])
def test_dense_and_paged_logits_unchanged(n, k, bias, r):
    cfg = _cfg(n, k, bias)
    base = random_params(cfg, seed=5)
    fused = fuse_projections(cfg, random_params(cfg, seed=5), r)
    assert "qkv_proj" in fused["model"]["layers"][0]["self_attn"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    dense = jax.jit(functools.partial(forward_dense, cfg=cfg))
    np.testing.assert_allclose(np.asarray(dense(fused, tokens=tokens)),
                               np.asarray(dense(base, tokens=tokens)), rtol=1e-5, atol=1e-5)

    (got, got_pool), (want, want_pool) = (prefill_one_sequence(cfg, p) for p in (fused, base))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_pool), jax.tree.leaves(want_pool)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_fp8_kv_scales_unchanged(r):
    cfg = _cfg(8, 4, bias=True)

    def params():  # KV head j's k/v weights x 4^j: each head its own power-of-two scale
        p = random_params(cfg, seed=2)
        gain = jnp.repeat(4.0 ** jnp.arange(4), cfg.head_dim)
        for layer in p["model"]["layers"]:
            for name in ("k_proj", "v_proj"):
                layer["self_attn"][name] = jax.tree.map(lambda x: (x.T * gain).T,
                                                        layer["self_attn"][name])
        return p

    base, fused = params(), fuse_projections(cfg, params(), r)
    for a, b in zip(base["model"]["layers"], fused["model"]["layers"]):
        want, got = layer_kv_scales(cfg, a, 448.0), layer_kv_scales(cfg, b, 448.0)
        assert len(set(np.asarray(want[0]).tolist())) == 4, "one scale per head, all different"
        for s, s0 in zip(got, want):
            np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_puts_block_i_on_device_i(tp):
    """Through TensorParallel.build (tp 4 > 2 KV heads: each KV head twice): every device holds
    exactly its query heads, its (copy of its) KV head and its MLP columns."""
    cfg = _cfg(8, 2)
    params = random_params(cfg, seed=4)
    orig = _host(params)["model"]["layers"][1]
    built = TensorParallel.build(cfg, params, tp)
    h = cfg.head_dim
    layer = built.params["model"]["layers"][1]
    qkv, gate_up = layer["self_attn"]["qkv_proj"], layer["mlp"]["gate_up_proj"]
    devices = list(built.mesh.devices.flat)
    for w in (qkv["weight"], qkv["bias"], gate_up["weight"]):
        assert w.shape[0] == tp and len(w.addressable_shards) == tp
    for s in qkv["weight"].addressable_shards:
        i = devices.index(s.device)
        assert s.data.shape[0] == 1
        kv_head = i * 2 // tp  # one KV head per device: the one its query heads read
        q = np.split(orig["self_attn"]["q_proj"]["weight"], tp)[i]
        k, v = (np.split(orig["self_attn"][p]["weight"], 2)[kv_head] for p in ("k_proj", "v_proj"))
        assert s.data.shape[1] == (8 // tp + 2) * h
        np.testing.assert_array_equal(np.asarray(s.data)[0], np.concatenate([q, k, v]))
    for s in gate_up["weight"].addressable_shards:
        i = devices.index(s.device)
        np.testing.assert_array_equal(np.asarray(s.data)[0], np.concatenate(
            [np.split(orig["mlp"][p]["weight"], tp)[i] for p in ("gate_proj", "up_proj")]))
    # the caller's tree: as it was (unfused, KV heads not expanded), no array deleted
    caller = params["model"]["layers"][1]
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    assert sorted(caller["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    np.testing.assert_array_equal(caller["self_attn"]["k_proj"]["weight"],
                                  orig["self_attn"]["k_proj"]["weight"])
    assert sorted(caller["mlp"]) == ["down_proj", "gate_proj", "up_proj"]


def test_engine_runs_fused_and_the_callers_params_stay_usable():
    cfg = _cfg(4, 2)
    model = TinyModel(cfg, random_params(cfg, seed=6))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    before = np.asarray(forward_dense(model.params, cfg, tokens))
    llm = LLM(loaded=model, num_gpu_blocks_override=16, max_model_len=64)
    for layer in llm.engine.runner.params["model"]["layers"]:
        assert "qkv_proj" in layer["self_attn"] and "gate_up_proj" in layer["mlp"]
        assert not {"q_proj", "k_proj", "v_proj"} & set(layer["self_attn"])
        assert not {"gate_proj", "up_proj"} & set(layer["mlp"])
    assert "q_proj" in model.params["model"]["layers"][0]["self_attn"]  # the caller's: as it was
    np.testing.assert_allclose(np.asarray(forward_dense(model.params, cfg, tokens)), before,
                               rtol=1e-5, atol=1e-5)

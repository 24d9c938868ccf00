"""Fused input projections: q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` matmul.

Why: at decode the projections are weight-read bound, and k_proj / v_proj are narrow (Qwen2.5-7B:
512 rows against 3584 of q_proj), so three separate gemms read the weights well below the memory
bandwidth; one wider gemm each (vLLM's QKVParallelLinear and MergedColumnParallelLinear) does not.

The layout, for ``r`` tensor-parallel shards (r = 1 on one device), N query heads, K KV heads (after
``pagedjax.worker.sharding.replicate_kv_heads``), H head dim, D model dim, F MLP dim::

    self_attn.qkv_proj.weight  [r, (N/r + 2 K/r) H, D]   block i: q rows of query heads
                                                         [i N/r, (i+1) N/r), then k rows of KV heads
                                                         [i K/r, (i+1) K/r), then v rows of the same
    self_attn.qkv_proj.bias    [r, (N/r + 2 K/r) H]      likewise, when the model has biases
    mlp.gate_up_proj.weight    [r, 2 F/r, D]             block i: gate rows [i F/r, (i+1) F/r),
                                                         then up rows of the same range

At r = 1 this is the plain concatenation [q; k; v] (and [gate; up]). Sharding the leading axis
over the mesh gives device i exactly its own query heads, KV heads and MLP columns, so the fused
matmul needs no communication: Megatron's column-parallel layout, written as data. The decoder
(pagedjax/models/decoder.py) reads r from the weight's shape, so both layouts run everywhere.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

logger = logging.getLogger(__name__)

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def qkv_sizes(cfg: ModelConfig, shards: int) -> tuple[int, int, int]:
    """Rows of q, k and v in each of the ``shards`` blocks of qkv_proj."""
    h = cfg.head_dim
    kv = cfg.num_key_value_heads // shards * h
    return cfg.num_attention_heads // shards * h, kv, kv


def block(parts, shards: int):
    """[rows_p, ...] per part -> [shards, sum_p rows_p / shards, ...]: block i holds the i-th
    slice of every part, in order."""
    return jnp.concatenate([x.reshape(shards, -1, *x.shape[1:]) for x in parts], axis=1)


def unblock(x, sizes, axis: int) -> list:
    """Inverse of :func:`block`: ``x`` has its blocks on ``axis - 1`` and the fused rows on
    ``axis``; returns one array per part, rows ``sizes[p]`` of every block merged back in order
    ([..., r, sum(sizes), ...] -> [..., r * sizes[p], ...])."""
    axis %= x.ndim
    parts = jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis)
    return [p.reshape(*x.shape[:axis - 1], -1, *x.shape[axis + 1:]) for p in parts]


def _unfuse(fused, names, sizes) -> dict:
    split = {key: unblock(x, sizes, axis=1) for key, x in fused.items()}
    return {name: {key: parts[i] for key, parts in split.items()} for i, name in enumerate(names)}


def qkv_parts(cfg: ModelConfig, attn) -> dict:
    """{"q_proj": {"weight", "bias"?}, "k_proj": ..., "v_proj": ...} of a layer's self_attn in
    either layout: its own entries when unfused, slices of qkv_proj when fused."""
    if "qkv_proj" not in attn:
        return {name: attn[name] for name in QKV}
    fused = attn["qkv_proj"]
    return _unfuse(fused, QKV, qkv_sizes(cfg, fused["weight"].shape[0]))


def gate_up_parts(mlp) -> dict:
    """{"gate_proj": ..., "up_proj": ...} of a layer's mlp in either layout."""
    if "gate_up_proj" not in mlp:
        return {name: mlp[name] for name in GATE_UP}
    fused = mlp["gate_up_proj"]
    rows = fused["weight"].shape[1] // 2
    return _unfuse(fused, GATE_UP, (rows, rows))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _relayout_attn(cfg: ModelConfig, attn, shards):
    parts = qkv_parts(cfg, attn)
    if shards is None:
        return parts
    return {"qkv_proj": {key: block([parts[n][key] for n in QKV], shards)
                         for key in parts["q_proj"]}}


@functools.partial(jax.jit, static_argnums=(1,))
def _relayout_mlp(mlp, shards):
    parts = gate_up_parts(mlp)
    if shards is None:
        return parts
    return {"gate_up_proj": {key: block([parts[n][key] for n in GATE_UP], shards)
                             for key in parts["gate_proj"]}}


def _shards(d, fused_name):
    return d[fused_name]["weight"].shape[0] if fused_name in d else None


def _relayout(d: dict, names, fused_name, shards, relayout, consume: bool) -> dict:
    """A copy of dict ``d`` in the target layout (``shards`` blocks, or unfused for None); with
    ``consume`` the arrays it replaces are deleted."""
    if _shards(d, fused_name) == shards:
        return d
    old_names = (fused_name,) if fused_name in d else names
    old = {n: d[n] for n in old_names}
    new = {n: x for n, x in d.items() if n not in old_names}
    new.update(jax.block_until_ready(relayout(old, shards)))  # one layer at a time
    if consume:
        for x in jax.tree.leaves(old):
            if isinstance(x, jax.Array):
                x.delete()
    return new


def fuse_projections(cfg: ModelConfig, params, shards: int, *, consume: bool = False):
    """A new tree: ``params`` with each layer's q/k/v as ``self_attn.qkv_proj`` and gate/up as
    ``mlp.gate_up_proj``, laid out for ``shards`` tensor-parallel devices (the module docstring);
    every other leaf is shared (the same objects). The caller's dicts are never rewritten.

    ``consume``: the caller gives up ``params``: each layer's original projections are deleted
    right after its fused ones exist, which keeps the peak at the weights plus one layer's
    projections (jit donation would not help: XLA reuses a donated buffer only for an output of
    the same shape, which a concatenation never has). A layer already fused for another
    ``shards`` is laid out again. Where the heads or the MLP columns do not split into ``shards``
    blocks, those projections are left (or made) unfused.
    """
    n, k, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    attn_shards = shards if n % shards == 0 and k % shards == 0 else None
    mlp_shards = shards if f % shards == 0 else None
    if attn_shards is None:
        logger.info("q/k/v projections left unfused: %d query / %d KV heads do not split into %d "
                    "blocks", n, k, shards)
    if mlp_shards is None:
        logger.info("gate/up projections left unfused: %d MLP columns do not split into %d "
                    "blocks", f, shards)
    relayout_attn = functools.partial(_relayout_attn, cfg)
    layers = [{**layer,
               "self_attn": _relayout(layer["self_attn"], QKV, "qkv_proj", attn_shards,
                                      relayout_attn, consume),
               "mlp": _relayout(layer["mlp"], GATE_UP, "gate_up_proj", mlp_shards, _relayout_mlp,
                                consume)}
              for layer in params["model"]["layers"]]
    return {**params, "model": {**params["model"], "layers": layers}}

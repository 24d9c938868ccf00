"""The parameter layout every loader fills: Hugging Face tensor names, shapes and the pytree.

One table (``param_shapes``) says which tensors a config needs and their ``[out, in]`` shapes; the
loaders check what they read against it, the dummy loader builds from it, and ``unflatten`` turns a
``{hf_name: array}`` dict into the pytree the decoder takes (``model.layers`` is a list).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .config import ModelConfig

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: Any) -> str:
    """Canonical dtype name ("float32", "bfloat16", "float16") of a name, alias or jnp dtype."""
    if not isinstance(dtype, str):
        dtype = jnp.dtype(dtype).name
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPE_NAMES)}")
    return name


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{hf_name: shape} of every tensor the decoder reads, in Hugging Face [out, in] orientation."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd = cfg.num_attention_heads * cfg.head_dim
    kvd = cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for name, out in (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)):
            shapes[p + f"self_attn.{name}.weight"] = (out, d)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (d, qd)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def is_norm(name: str) -> bool:
    return "layernorm" in name or name == "model.norm.weight"


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.layers.0.mlp.up_proj.weight": x, ...} -> nested dicts, ``layers`` as a list."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    layers = tree.get("model", {}).get("layers")
    if layers is not None:
        tree["model"]["layers"] = [layers[str(i)] for i in range(len(layers))]
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`unflatten`."""
    flat = {}
    items = enumerate(tree) if isinstance(tree, list) else tree.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...], source: str) -> None:
    if tuple(shape) != tuple(want):
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shape)} but the config "
                         f"needs {tuple(want)}")

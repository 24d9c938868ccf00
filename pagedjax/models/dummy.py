"""Random weights of a real model's shape (vLLM's ``--load-format dummy``), for benchmarks with no
download. The shipped ``configs/*.json`` are the real Hugging Face ``config.json`` files.

``abstract_params`` gives shapes and dtypes only (``jax.ShapeDtypeStruct``: nothing is allocated),
which is what memory planning needs; ``dummy_params`` allocates, with jitted generators so the
weights are made directly on the default device rather than copied from the host. The same seed
gives the same weights on the same backend (the fast RBG generator is backend-specific).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from . import fp8
from .config import ModelConfig
from .params import DTYPE_NAMES, is_norm, param_shapes, unflatten

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


def _normalise(name: str) -> str:
    # "meta-llama/Meta-Llama-3-8B" and "Llama-3-8B" name the same shipped file.
    name = name.rsplit("/", 1)[-1].lower().removesuffix(".json")
    return name.removeprefix("meta-")


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def shipped_config_path(name: str) -> Path | None:
    """The shipped config.json for a model name or hub id (case and org prefix ignored)."""
    for stem, path in shipped_configs().items():
        if _normalise(stem) == _normalise(name):
            return path
    return None


def dummy_config(model: str) -> ModelConfig:
    """Config for dummy weights: a shipped name, a config.json file, or a folder holding one."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        shipped = shipped_config_path(model)
        if shipped is None:
            raise ValueError(
                f"load_format='dummy': {model!r} is not a shipped config name, a config.json or "
                f"a folder with one; shipped configs: {sorted(shipped_configs())}")
        path = shipped
    cfg = ModelConfig.from_json(path)
    name = cfg.name or (path.stem if path.parent == CONFIG_DIR else path.parent.name)
    return dataclasses.replace(cfg, name=name)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, index, shape, dtype):
    # 0.02 is the usual initializer_range: keeps activations finite over many layers.
    # Drawn in the target dtype: a float32 draw cast down would briefly double the largest
    # tensor (2 GiB for Qwen2.5-7B's embedding).
    x = jax.random.normal(jax.random.fold_in(key, index), shape, dtype)
    return x * jnp.asarray(0.02, dtype)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal_fp8(key, index, shape, dtype):
    # one program: the full-precision draw lives only inside it, one tensor at a time
    return fp8.quantize_weight(_normal(key, index, shape, dtype))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _ones(shape, dtype):
    return jnp.ones(shape, dtype)


def abstract_params(cfg: ModelConfig, dtype: str = "bfloat16", quantization: str | None = None):
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves; allocates nothing. ``quantization``
    "fp8": the linears as float8 with [out] float32 scales (pagedjax/models/fp8.py)."""
    dt = DTYPE_NAMES[dtype]
    flat = {}
    for name, shape in param_shapes(cfg).items():
        if quantization and fp8.is_quantized_linear(name):
            flat[name] = jax.ShapeDtypeStruct(shape, fp8.FP8)
            flat[fp8.scale_name(name)] = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
        else:
            flat[name] = jax.ShapeDtypeStruct(shape, dt)
    return unflatten(flat)


def dummy_params(cfg: ModelConfig, dtype: str = "bfloat16", seed: int = 0,
                 quantization: str | None = None):
    """Random normal * 0.02 weights (ones for norms), generated on the default device.

    One small jitted generator per distinct shape (about ten per model), called per tensor: a
    single jitted init of the whole model would unroll hundreds of RNG ops and compile for
    minutes, and peak memory stays at the params themselves. ``quantization`` "fp8": each
    linear is quantised inside its own generator, so only fp8 weights are ever held.
    """
    logger.info("dummy weights for %s: %.2fB params in %s%s", cfg.name or "model",
                cfg.num_params() / 1e9, dtype, ", fp8 linears" if quantization else "")
    dt = DTYPE_NAMES[dtype]
    key = jax.random.key(seed, impl="unsafe_rbg")  # fast; statistical quality is moot here
    flat = {}
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        if is_norm(name):
            flat[name] = _ones(shape, dt)
        elif quantization and fp8.is_quantized_linear(name):
            flat[name], flat[fp8.scale_name(name)] = _normal_fp8(key, i, shape, dt)
        else:
            flat[name] = _normal(key, i, shape, dt)
    return unflatten(flat)

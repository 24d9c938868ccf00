"""Hugging Face checkpoints whose linear weights are already FP8.

Two formats, told apart by ``config.json``'s ``quantization_config.quant_method``:

    "compressed-tensors"  llm-compressor's ``float-quantized`` format (RedHatAI/neuralmagic FP8
                          models): float8_e4m3fn weights, ``weight_scale`` per tensor ([] or
                          [1]) or per output channel ([out, 1]); layers in ``ignore`` stay bf16
    "fp8"                 vLLM's / transformers' own: float8_e4m3fn weights with ``weight_scale``
                          per tensor, or ``weight_scale_inv`` (a multiplier despite the name)

Either way ``w = weight * scale``; pagedjax holds one float32 scale per output channel
(pagedjax/models/fp8.py), so a per-tensor scale is broadcast, exactly. Block-wise scales
(``weight_block_size``, DeepSeek-V3 / Qwen3-FP8 style, strategy "block" or "group") are refused
by name. A checkpoint's static ``input_scale`` is not read: activations are scaled per token in
the step, which never clips. Which linears are fp8 is read from each tensor's dtype, so an
``ignore`` list needs no parsing.

safetensors' numpy and Flax readers cannot return float8 (numpy has no such dtype), so fp8
tensors are read here from the file's header and bytes (the format is a JSON header and raw
little-endian arrays), memory-mapped, as ml_dtypes arrays.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

SCALE_NAMES = ("weight_scale", "weight_scale_inv")
_FP8_DTYPES = {"F8_E4M3": jnp.float8_e4m3fn}


def checkpoint_quantization(hf_config: dict, source: str = "config.json") -> str | None:
    """"fp8" when ``hf_config`` describes an FP8 checkpoint pagedjax reads, None when it has no
    ``quantization_config``; ValueError naming what is not supported otherwise."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    supported = ("compressed-tensors (format float-quantized) and fp8 (per-tensor or "
                 "per-channel scales)")
    if method == "fp8":
        if q.get("weight_block_size"):
            raise ValueError(f"{source}: fp8 checkpoint with block-wise weight scales "
                             f"(weight_block_size {q['weight_block_size']}) is not supported; "
                             f"pagedjax reads {supported}")
        return "fp8"
    if method == "compressed-tensors":
        if q.get("format") != "float-quantized":
            raise ValueError(f"{source}: compressed-tensors format {q.get('format')!r} is not "
                             f"supported; pagedjax reads {supported}")
        for name, group in (q.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(f"{source}: compressed-tensors group {name!r} has "
                                 f"{w.get('num_bits')}-bit {w.get('type')} weights; pagedjax "
                                 f"reads 8-bit float weights only")
            if w.get("strategy") not in ("tensor", "channel"):
                raise ValueError(f"{source}: compressed-tensors group {name!r} scales weights "
                                 f"by {w.get('strategy')!r}; pagedjax supports 'tensor' and "
                                 "'channel' (block-wise and group-wise scales are not supported)")
        return "fp8"
    raise ValueError(f"{source}: quantization_config quant_method {method!r} is not supported; "
                     f"pagedjax reads {supported}, or a bf16/fp16 checkpoint that "
                     "--quantization fp8 quantises at load")


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_fp8(path: Path, name: str) -> np.ndarray:
    """One float8 tensor of a safetensors file, memory-mapped."""
    header, start = _header(path)
    info = header[name]
    if info["dtype"] not in _FP8_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} is {info['dtype']}; pagedjax reads FP8 "
                         f"weights stored as {sorted(_FP8_DTYPES)}")
    begin, end = info["data_offsets"]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return raw.view(_FP8_DTYPES[info["dtype"]]).reshape(info["shape"])


def channel_scales(name: str, scale, out: int, source: str):
    """A stored scale ([], [1], [out] or [out, 1]) as [out] float32; ValueError otherwise."""
    s = jnp.asarray(scale, jnp.float32)
    if s.size == 1:
        return jnp.full((out,), s.reshape(()), jnp.float32)
    if s.shape in ((out,), (out, 1)):
        return s.reshape(out)
    raise ValueError(f"{source}: {name!r} has shape {tuple(s.shape)}, neither per-tensor nor "
                     f"per-channel ([{out}, 1]) for a weight of {out} rows; block-wise scales "
                     "are not supported")

"""``load_model``: the one entry point from a model name to (config, params, tokenizer).

``load_format="auto"`` picks by what ``model`` is:
    None                              the embedded SmolLM2-135M-Instruct GGUF
    a path ending in .gguf            GGUF
    a folder with pagedjax_config.json  orbax checkpoint (pagedjax/models/checkpoint.py)
    a folder with config.json         Hugging Face safetensors
    anything else                     a Hugging Face Hub id (downloaded with huggingface_hub)
``load_format="dummy"`` takes a shipped config name (``Qwen/Qwen2.5-7B-Instruct``), a config.json
or a folder with one, and makes random weights of that shape; it is never picked automatically.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax

from . import checkpoint, dummy, embedded, fp8, hf
from .config import ModelConfig
from .params import dtype_name

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "hf", "gguf", "dummy", "orbax")


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any  # pytree of jax arrays, Hugging Face names (pagedjax/models/params.py)
    tokenizer: Any  # a transformers tokenizer, or None (dummy weights, folders without one)
    dtype: str  # "float32" | "bfloat16" | "float16"
    source: str = ""  # the file or folder the weights came from
    # "fp8": the linears are float8 with scales (pagedjax/models/fp8.py)
    quantization: str | None = None


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """The one rule for ``--dtype``: "auto" is bfloat16 on accelerators (half the memory and
    bandwidth) and float32 on the CPU, where bfloat16 matmuls are emulated and slower.
    ``platform`` defaults to JAX's backend; the planner passes "gpu" (it plans for one)."""
    if dtype == "auto":
        return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    return dtype_name(dtype)


def detect_format(model: str) -> str:
    path = Path(model)
    if model.endswith(".gguf"):
        return "gguf"
    if path.is_dir() and checkpoint.is_checkpoint(path):
        return "orbax"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if path.exists():
        raise ValueError(f"{path}: not a .gguf file, a folder with config.json, or a pagedjax "
                         "checkpoint; pass load_format explicitly if it is one of them")
    return "hub"


def load_model(model: str | Path | None = None, load_format: str = "auto", dtype: str = "auto",
               tokenizer: Any = None, seed: int = 0,
               quantization: str | None = None) -> LoadedModel:
    """Load config, params (jax arrays on the default device) and tokenizer.

    tokenizer: None loads the model's own (none for dummy weights); a string loads that folder or
    hub id with transformers; any other object is used as is.
    seed: only used by dummy weights.
    quantization: "fp8" quantises the linears to float8 as they are loaded (pagedjax/models/fp8.py);
    an FP8 checkpoint (pagedjax/models/fp8_checkpoint.py) is fp8 whatever this says.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
    fp8.check_quantization(quantization)
    dtype = resolve_dtype(dtype)
    if model is None:
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format={load_format!r} needs a model; the embedded default "
                             "model is a GGUF")
        model = embedded.embedded_model_path()
    model = str(model)
    fmt = detect_format(model) if load_format == "auto" else load_format
    t0 = time.perf_counter()
    source = model
    own_tokenizer = None
    if fmt == "dummy":
        cfg = dummy.dummy_config(model)
        params = dummy.dummy_params(cfg, dtype, seed, quantization)
    elif fmt == "gguf":
        from . import gguf_loader  # the gguf package only when a GGUF file is read

        reader = gguf_loader.open_gguf(model)
        cfg, params = gguf_loader.load_gguf(model, dtype, reader)
        if tokenizer is None:
            own_tokenizer = gguf_loader.load_gguf_tokenizer(model, reader)
    elif fmt == "orbax":
        cfg, params, dtype = checkpoint.restore_checkpoint(model, dtype)
        if tokenizer is None:
            own_tokenizer = checkpoint.restore_tokenizer(model)
    else:  # "hf" or "hub"
        folder = Path(model) if fmt == "hf" else hf.resolve_hub_id(model)
        source = str(folder)
        cfg, params, quantization = hf.load_hf_folder(folder, dtype, quantization)
        if tokenizer is None:
            own_tokenizer = hf.load_tokenizer(folder)
    if fmt in ("gguf", "orbax") and quantization:
        # these formats hold the whole model in ``dtype`` first (GGUF dequantises anyway); the
        # peak is that plus one tensor, as each original goes once its fp8 copy exists
        params = fp8.quantize_params(params, consume=True)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = hf.load_tokenizer(tokenizer)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    logger.info("loaded %s (%s, %.2fB params, %s%s, %.2f GiB of weights) in %.1f s",
                cfg.name or source, fmt, cfg.num_params() / 1e9, dtype,
                ", fp8 linears" if quantization else "", nbytes / 2**30,
                time.perf_counter() - t0)
    return LoadedModel(cfg, params, tokenizer if tokenizer is not None else own_tokenizer,
                       dtype, source, quantization)

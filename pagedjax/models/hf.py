"""Hugging Face checkpoints: a folder with ``config.json`` and single or sharded safetensors.

Tensors are read one at a time with safetensors' Flax backend (bf16 stays bf16; numpy has no
bf16) and cast to the target dtype on the default device, so peak memory is the params plus one
tensor. No torch at run time. A hub id is resolved to a local snapshot with huggingface_hub.
With ``--quantization fp8`` each linear is quantised as it is read (pagedjax/models/fp8.py); a
checkpoint whose linears are already FP8 is read as it is (pagedjax/models/fp8_checkpoint.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax.numpy as jnp
from safetensors import safe_open
from tqdm.auto import tqdm

from . import fp8, fp8_checkpoint
from .config import ModelConfig
from .params import DTYPE_NAMES, check_shape, param_shapes, unflatten

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# What a snapshot needs: the config, the weights and the tokenizer files (never *.bin / *.pth).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) a hub snapshot; return its folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, gated, misspelt: all say the same thing to the user
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local file or folder nor a Hugging Face Hub model that "
            f"could be downloaded ({type(e).__name__}: {e}). Pass a local folder with "
            "config.json + *.safetensors, a .gguf file, or load_format='dummy' with a shipped "
            "config name") from e


def shard_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} for a folder; every file the index names must exist."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / fname for name, fname in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.exists()})
        if missing:
            raise FileNotFoundError(
                f"{index}: names shard(s) {missing} that are missing from {folder}; the download "
                "is incomplete; fetch the missing files again")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (and no {INDEX_FILE}); "
                                "pagedjax reads safetensors only, not PyTorch .bin files")
    files = {}
    for path in paths:
        with safe_open(path, framework="flax") as f:
            files.update({name: path for name in f.keys()})
    return files


def load_params(folder: str | Path, cfg: ModelConfig, dtype: str,
                quantization: str | None = None, stored: str | None = None) -> dict:
    """Read every tensor ``cfg`` needs from the folder's safetensors, cast to ``dtype``.

    ``stored`` "fp8": the checkpoint's linears are already FP8 (pagedjax/models/fp8_checkpoint.py)
    and are kept so, with their scales as [out] float32. Else ``quantization`` "fp8" quantises each
    linear as it is read (pagedjax/models/fp8.py), so the full-precision weights never all exist at
    once.
    """
    folder = Path(folder)
    files = shard_files(folder)
    want = param_shapes(cfg)
    missing = [n for n in want if n not in files]
    if missing:
        raise ValueError(
            f"{folder}: tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} are missing "
            f"from the safetensors files ({sorted({p.name for p in files.values()})})")
    by_file: dict[Path, list[str]] = {}
    for name in want:
        by_file.setdefault(files[name], []).append(name)
    flat = {}
    target = DTYPE_NAMES[dtype]
    quantize = quantization == "fp8" and stored is None
    with tqdm(total=len(want), desc=f"Loading {folder.name}", unit="tensor", leave=False) as bar:
        for path, names in by_file.items():
            with safe_open(path, framework="flax") as f:
                for name in names:
                    if stored and f.get_slice(name).get_dtype().startswith("F8"):
                        flat.update(_read_fp8_linear(files, name, want[name], path))
                    else:
                        x = f.get_tensor(name)
                        check_shape(name, x.shape, want[name], str(path))
                        x = jnp.asarray(x, dtype=target)
                        flat.update(fp8.quantize_tensor(name, x) if quantize else {name: x})
                    bar.update()
    scales = set(fp8_checkpoint.SCALE_NAMES) if stored else set()
    extra = sorted(n for n in set(files) - set(want) if n.rsplit(".", 1)[-1] not in scales)
    if extra:  # e.g. lm_head.weight of a tied model, rotary inv_freq buffers, input_scale
        logger.info("%s: ignoring %d tensor(s) the decoder does not use: %s", folder,
                    len(extra), extra[:5])
    return unflatten(flat)


def _read_fp8_linear(files: dict[str, Path], name: str, shape, path: Path) -> dict:
    """{name: float8 weight, name_scale: [out] float32} of one linear of an FP8 checkpoint."""
    if not fp8.is_quantized_linear(name) and name != "lm_head.weight":
        raise ValueError(f"{path}: tensor {name!r} is stored in FP8; pagedjax reads FP8 only "
                         f"for the linear layers ({', '.join(fp8.LINEARS[:7])}, lm_head)")
    w = fp8_checkpoint.read_fp8(path, name)
    check_shape(name, w.shape, shape, str(path))
    base = name.removesuffix("weight")
    scale = next((base + s for s in fp8_checkpoint.SCALE_NAMES if base + s in files), None)
    if scale is None:
        raise ValueError(f"{path}: FP8 weight {name!r} has no {base}weight_scale (or "
                         "weight_scale_inv) in the checkpoint")
    with safe_open(files[scale], framework="flax") as f:
        s = fp8_checkpoint.channel_scales(scale, f.get_tensor(scale), shape[0], str(files[scale]))
    return {name: jnp.asarray(w), fp8.scale_name(name): s}


def load_hf_folder(folder: str | Path, dtype: str,
                   quantization: str | None = None) -> tuple[ModelConfig, dict, str | None]:
    """(cfg, params, quantization): the latter "fp8" when the linears are fp8, because the
    checkpoint stores them so or ``quantization`` asked for it."""
    folder = Path(folder)
    cfg = ModelConfig.from_json(folder / "config.json")
    hf_config = json.loads((folder / "config.json").read_text())
    stored = fp8_checkpoint.checkpoint_quantization(hf_config, str(folder / "config.json"))
    if stored and quantization is None:
        logger.info("%s: an %s checkpoint; its linears run in fp8", folder, stored)
    params = load_params(folder, cfg, dtype, quantization, stored)
    return cfg, params, stored or quantization


def load_tokenizer(source: str | Path):
    """transformers tokenizer of a folder or hub id, or None (with a warning) if it has none."""
    from transformers import AutoTokenizer

    try:
        # False, not the default None: None asks on stdin whether to run a folder's own code
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as e:
        logger.warning("%s: no tokenizer could be loaded (%s); pass tokenizer=... to load_model "
                       "to decode text", source, e)
        return None

"""Save and restore converted params with orbax-checkpoint, for fast reload.

Dequantising a GGUF or casting a safetensors folder costs seconds to minutes; a restore reads the
arrays back in the target dtype directly. The folder holds:
    pagedjax_config.json   the ModelConfig and the dtype the params were saved in
    params/                the orbax PyTree checkpoint
    tokenizer/             the tokenizer (save_pretrained), when there is one
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .config import ModelConfig, RopeScaling
from .dummy import abstract_params
from .fp8 import is_fp8

logger = logging.getLogger(__name__)

CONFIG_FILE = "pagedjax_config.json"
FORMAT_VERSION = 1


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return ModelConfig(**d)


def save_checkpoint(path: str | Path, cfg: ModelConfig, params, dtype: str,
                    tokenizer=None) -> Path:
    """Write params (+ config, + tokenizer) to ``path``, which must not exist yet."""
    import orbax.checkpoint as ocp  # imported here: it adds 0.25 s to every pagedjax import

    if is_fp8(params):
        raise ValueError("fp8-quantised params cannot be saved as a pagedjax checkpoint: save "
                         "the model in its own dtype and load it with --quantization fp8")
    path = Path(path).absolute()  # orbax refuses relative paths
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new checkpoint folder")
    path.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params)
        ckptr.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "tokenizer")
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "config": _config_to_dict(cfg)}
    # Written last: its presence marks a complete checkpoint (see is_checkpoint).
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("saved %s params to %s", cfg.name or "model", path)
    return path


def restore_checkpoint(path: str | Path, dtype: str | None = None):
    """(cfg, params, dtype) from ``path``; ``dtype`` None keeps the dtype it was saved in."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a pagedjax checkpoint (no {CONFIG_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: checkpoint format version "
                         f"{meta.get('format_version')} is not {FORMAT_VERSION}; save it again")
    cfg = _config_from_dict(meta["config"])
    dtype = dtype or meta["dtype"]
    # The abstract tree gives orbax the structure (layers as a list) and the dtype to cast to.
    target = abstract_params(cfg, dtype)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return cfg, params, dtype


def restore_tokenizer(path: str | Path):
    tok_dir = Path(path) / "tokenizer"
    if not tok_dir.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)

"""What ``--model`` names, without reading weights: its config (a shipped config name, a Hugging
Face folder or ``config.json``, a ``.gguf`` file's metadata, or a hub id's ``config.json``) and,
when a request log has text to count, its tokenizer. The hub is tried only after the local cache,
and only when it can be reached, so an offline planner fails at once with a clear error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import urllib.parse
from pathlib import Path

from pagedjax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    cfg: ModelConfig
    kind: str  # "shipped config", "HF folder", "config.json", "GGUF", "hub"
    source: str
    tokenizer: tuple[str, str | None] | None = None  # (folder or hub id, gguf file name)
    gguf_tensor_bytes: int | None = None  # tensors as stored in the file (quantised)
    note: str | None = None  # how the name was resolved, when it is not the obvious way
    quantization: str | None = None  # "fp8": an FP8 checkpoint (pagedjax/models/fp8_checkpoint.py)


_VARIANT_WORDS = {"chat", "instruct", "it", "hf"}


def _base_name(name: str) -> str:
    """``meta-llama/Llama-2-70b-chat-hf`` -> ``llama-2-70b``: the org and variant words dropped."""
    words = re.split(r"[-_]", name.rsplit("/", 1)[-1].lower())
    return "-".join(w for w in words if w not in _VARIANT_WORDS)


def same_shape_config(model: str) -> Path | None:
    """The shipped config of the same model without its chat/instruct suffix, if exactly one."""
    from pagedjax.models import dummy

    found = [p for stem, p in dummy.shipped_configs().items()
             if _base_name(stem) == _base_name(model)]
    return found[0] if len(found) == 1 else None


def _from_json(path: Path, kind: str, name: str, tokenizer=None) -> ResolvedModel:
    from pagedjax.models.fp8_checkpoint import checkpoint_quantization

    cfg = ModelConfig.from_json(path)
    quantization = checkpoint_quantization(json.loads(path.read_text()), str(path))
    return ResolvedModel(dataclasses.replace(cfg, name=cfg.name or name), kind, str(path),
                         tokenizer, quantization=quantization)


def _from_gguf(path: Path) -> ResolvedModel:
    """The loader's own GGUF metadata reading; no tensor is dequantised."""
    from gguf import GGUFReader

    from pagedjax.models import gguf_loader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_loader.read_config(reader, path)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    return ResolvedModel(cfg, "GGUF", str(path), (str(path.parent), path.name), stored)


def _hub_reachable() -> None:
    """Raise OSError at once when the hub cannot be reached, instead of huggingface_hub's retries
    (half a minute offline). Behind a proxy the proxy decides: no direct probe then."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set and it is not in the local cache")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urllib.parse.urlparse(constants.ENDPOINT)
    socket.create_connection((url.hostname, url.port or 443), timeout=5).close()


def _offline_first(load):
    """``load(local_files_only)``: the local Hugging Face cache first, then the hub if it can be
    reached, with huggingface_hub's retry warnings silenced (the final error is reported once)."""
    from huggingface_hub.utils import logging as hf_logging

    try:
        return load(True)
    except Exception:
        pass
    _hub_reachable()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(False)
    finally:
        hf_logging.set_verbosity(level)


def _first_line(e: Exception) -> str:
    """An exception in one line: huggingface_hub's messages run over many."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _hub_config_path(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_offline_first(  # the config only, never the weights
        lambda local: hf_hub_download(repo_id, "config.json", local_files_only=local)))


def resolve_model(model: str) -> ResolvedModel:
    """A model's config without its weights: a local path, a shipped config name (a hub id whose
    name is shipped counts: no network needed), or a hub id."""
    from pagedjax.models import dummy

    path = Path(model).expanduser()
    hub_like = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: the folder has no config.json")
        return _from_json(path / "config.json", "HF folder", path.name, (str(path), None))
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path)
        return _from_json(path, "config.json", path.parent.name)
    shipped, note = dummy.shipped_config_path(model), None
    if shipped is None:
        shipped = same_shape_config(model)
        if shipped is not None:
            note = (f"--model {model}: not shipped by that name; using the shipped config "
                    f"{shipped.stem}, the same model without its chat/instruct suffix (fine-tunes "
                    "keep their base's shape), offline. Pass a config.json for another shape.")
    if shipped is not None:
        res = _from_json(shipped, "shipped config", shipped.stem,
                         (model, None) if hub_like else None)
        return dataclasses.replace(res, note=note)
    names = ", ".join(sorted(dummy.shipped_configs())) or "none"
    if not hub_like or model.endswith((".gguf", ".json")):
        raise ValueError(f"--model {model!r}: unknown model: no such file or folder and not a "
                         f"shipped config (shipped: {names}); give an HF folder, a config.json, "
                         "a .gguf file, a shipped config name or a hub id like Qwen/Qwen2.5-7B")
    try:
        cfg_path = _hub_config_path(model)
    except Exception as e:  # offline, gated, misspelt: all end here
        raise ValueError(
            f"--model {model!r}: not a local path or a shipped config, and its config.json could "
            f"not be fetched from the Hugging Face hub ({_first_line(e)}). Check the "
            f"name and the network, or pass a local folder, a .gguf file or a shipped config "
            f"name ({names})") from None
    return dataclasses.replace(_from_json(cfg_path, "hub", model, (model, None)), source=model)


def load_tokenizer(source: str, gguf_file: str | None = None):
    """The loaders' tokenizer loading, with an error instead of None; a hub id's from the local
    cache first, and the hub only if it can be reached."""
    from pagedjax.models import gguf_loader, hf

    if gguf_file:
        tok = gguf_loader.load_gguf_tokenizer(Path(source) / gguf_file)
    elif Path(source).expanduser().exists():
        tok = hf.load_tokenizer(source)
    else:
        from transformers import AutoTokenizer

        try:
            tok = _offline_first(lambda local: AutoTokenizer.from_pretrained(
                source, trust_remote_code=False, local_files_only=local))
        except Exception as e:
            raise ValueError(f"could not load a tokenizer for {source!r} from the local cache or "
                             f"the hub ({_first_line(e)}): pass --tokenizer with a "
                             'folder or .gguf, or log token counts ("prompt_tokens": N)') from None
    if tok is None:
        raise ValueError(f"could not load a tokenizer from {source!r}"
                         f"{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: pass --tokenizer "
                         "with a tokenizer folder or hub id")
    return tok


class LazyTokenizer:
    """Loaded when a line needs one (text prompts, chat messages); token counts need none."""

    def __init__(self, source: tuple[str, str | None] | None, kind: str, model: str):
        self.source, self.what, self._tok, self._error = source, f"{kind} {model!r}", None, None

    def __getattr__(self, name):
        if self._tok is None:
            if self._error is None:  # tried once: a failure is the answer for every line
                try:
                    if self.source is None:
                        raise ValueError(
                            f"a text prompt needs a tokenizer and {self.what} has none: pass "
                            "--tokenizer (a folder, hub id or .gguf), or log token counts "
                            '("prompt_tokens": N) instead of text')
                    self._tok = load_tokenizer(*self.source)
                except ValueError as e:
                    self._error = str(e)
            if self._error is not None:
                raise ValueError(self._error)
        return getattr(self._tok, name)

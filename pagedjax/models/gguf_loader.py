"""GGUF files (llama.cpp): config from the metadata, weights dequantised with the ``gguf`` package.

Two things differ from a Hugging Face checkpoint and are undone here:
- names: ``blk.{i}.attn_q.weight`` is ``model.layers.{i}.self_attn.q_proj.weight`` and so on;
- llama.cpp's converter permutes the rows of q/k for the *llama* architecture (it uses the
  interleaved rope layout where HF uses rotate-half); we apply the inverse permutation, the same
  one transformers applies. Qwen2 files are not permuted.
Llama-3.1-style rope scaling is stored as a ``rope_freqs.weight`` tensor of per-frequency divisors
rather than as parameters; we recognise the known parameter sets by recomputing the divisors.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

from . import gguf_tokenizer
from .config import ModelConfig, RopeScaling
from .decoder import rope_inv_freq
from .params import DTYPE_NAMES, check_shape, param_shapes, unflatten

logger = logging.getLogger(__name__)

SUPPORTED_QUANTS = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                              Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) of the released
# Llama 3.1 (8B/70B/405B) and Llama 3.2 (1B/3B) checkpoints.
_KNOWN_LLAMA3_SCALING = [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192)]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if the decoder does not use it."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def read_config(reader: GGUFReader, path: Path) -> ModelConfig:
    """ModelConfig from the ``{arch}.*`` metadata keys (the keys transformers maps too)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; pagedjax reads "
                         f"{sorted(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}

    def key(k, default=None):
        v = _field(reader, f"{arch}.{k}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{k!r} is missing")
        return v

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise ValueError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ValueError(f"{path}: rope scaling type {scaling_type!r} is not supported; pagedjax "
                         "supports the default rope and Llama-3.1 scaling")
    hf = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "_name_or_path": _field(reader, "general.name", path.stem),
    }
    cfg = ModelConfig.from_hf(hf, source=str(path))
    if "rope_freqs.weight" in names:
        freqs = _dequant(next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
        cfg = _with_llama3_scaling(cfg, freqs.reshape(-1), path)
    return cfg


def _with_llama3_scaling(cfg: ModelConfig, divisors: np.ndarray, path: Path) -> ModelConfig:
    base = rope_inv_freq(cfg)
    for factor, low, high, orig in _KNOWN_LLAMA3_SCALING:
        cand = dataclasses.replace(cfg, rope_scaling=RopeScaling(factor, low, high, orig))
        if np.allclose(base / rope_inv_freq(cand), divisors, rtol=1e-4):
            return cand
    raise ValueError(f"{path}: rope_freqs.weight holds frequency divisors that match no known "
                     f"Llama-3.1/3.2 rope scaling ({_KNOWN_LLAMA3_SCALING}); load the Hugging "
                     "Face checkpoint instead")


def _dequant(t) -> np.ndarray:
    """float32 array in numpy (= Hugging Face [out, in]) order; GGUF lists dims reversed."""
    w = dequantize(t.data, t.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py) on q/k rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader; parsing the metadata takes seconds (a vocabulary is ~100k strings), so
    the weights and the tokenizer share one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return GGUFReader(path)


def load_gguf(path: str | Path, dtype: str,
              reader: GGUFReader | None = None) -> tuple[ModelConfig, dict]:
    path = Path(path)
    reader = reader or open_gguf(path)
    cfg = read_config(reader, path)
    want = param_shapes(cfg)
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name in want:
            tensors[name] = t
        elif t.name != "rope_freqs.weight":
            logger.info("%s: ignoring tensor %s", path, t.name)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise ValueError(f"{path}: tensor(s) {missing[:5]} are missing from the GGUF file")
    bad = [(t.name, t.tensor_type.name) for t in tensors.values()
           if t.tensor_type not in SUPPORTED_QUANTS]
    if bad:  # checked before any work: dequantising a large file first would waste minutes
        raise ValueError(
            f"{path}: tensor {bad[0][0]!r} is quantised as {bad[0][1]}, which pagedjax cannot "
            f"dequantise ({len(bad)} tensor(s) affected); supported quant types: "
            f"{sorted(q.name for q in SUPPORTED_QUANTS)}")
    permute = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    target = DTYPE_NAMES[dtype]
    flat = {}
    for name, t in tqdm(tensors.items(), desc=f"Dequantising {path.name}", unit="tensor",
                        leave=False):
        w = _dequant(t)
        check_shape(name, w.shape, want[name], str(path))
        proj = name.split(".")[-2]
        if cfg.family == "llama" and proj in permute:
            w = unpermute_qk(w, permute[proj])
        flat[name] = jnp.asarray(w, dtype=target)
    return cfg, unflatten(flat)


def load_gguf_tokenizer(path: str | Path, reader: GGUFReader | None = None):
    """The tokenizer stored in the GGUF metadata (built without torch,
    pagedjax/models/gguf_tokenizer.py); None, with a warning, if the file has none pagedjax can
    build."""
    try:
        return gguf_tokenizer.load_gguf_tokenizer(path, reader or open_gguf(path))
    except ValueError as e:
        logger.warning("%s; the model runs on token ids only", e)
        return None

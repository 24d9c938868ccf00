"""Model configuration: one frozen dataclass for every supported decoder (Llama 2/3/3.1, Qwen2/2.5).

Built from a Hugging Face ``config.json`` dict with :meth:`ModelConfig.from_hf`. The differences
between the families are plain fields (qkv bias, tied embeddings, rope theta and scaling), so one
decoder serves them all.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "llama",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}


def _sliding_window(cfg: dict[str, Any], source: str) -> int | None:
    """The window every layer slides over, as transformers reads the config: Mistral's
    ``sliding_window`` (4096 when absent); Qwen2's only with ``use_sliding_window``, and then on
    the layers from ``max_window_layers`` on (or those ``layer_types`` names)."""
    model_type = cfg.get("model_type", "")
    n = cfg["num_hidden_layers"]
    if model_type == "mistral" or "MistralForCausalLM" in (cfg.get("architectures") or []):
        first = 0
    elif model_type == "qwen2" and cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", 28)
    else:
        return None
    window = cfg.get("sliding_window", 4096)
    if window is None:
        return None
    kinds = cfg.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)]
    sliding = sum(k == "sliding_attention" for k in kinds)
    if sliding == 0:
        return None
    if sliding != n:
        raise ValueError(f"{source}: {sliding} of {n} layers use a sliding window of {window} "
                         "tokens and the rest full attention; pagedjax supports one window for "
                         "every layer or none (set max_window_layers to 0 or >= the number of "
                         "layers)")
    if int(window) < 1:
        raise ValueError(f"{source}: sliding_window {window} must be a positive number of tokens")
    return int(window)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling: Llama-3.1's "llama3" (low frequencies divided by ``factor``, high
    ones kept, a smooth blend between) or "linear" position interpolation (every frequency
    divided by ``factor``: LLaMA-2-7B-32K and other long-context fine-tunes)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # every layer attends to the last ``sliding_window`` positions only (Mistral; Qwen2 with
    # use_sliding_window); None: full causal attention
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def num_params(self) -> int:
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.attention_bias:
            attn += n * h + 2 * k * h
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict; ``source`` names the file in error messages."""
        archs = cfg.get("architectures") or []
        family = None
        for a in archs:
            family = family or SUPPORTED_ARCHITECTURES.get(a)
        family = family or _MODEL_TYPES.get(cfg.get("model_type", ""))
        if family is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; pagedjax "
                f"supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        # transformers >= 5 writes rope settings under "rope_parameters"; older files use
        # "rope_theta" and "rope_scaling" at the top level.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or rope
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type in (None, "default"):
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif rope_type == "linear":
            rope_scaling = RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
        else:
            raise ValueError(f"{source}: unsupported rope scaling type {rope_type!r}; pagedjax "
                             "supports the default rope, 'linear' and 'llama3' scaling")
        sliding_window = _sliding_window(cfg, source)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=cfg.get("_name_or_path", ""),
            sliding_window=sliding_window,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path))

"""Helpers for the loader tests: tiny transformers checkpoints and synthetic GGUF files.

torch and transformers' models are imported inside the functions: they are test dependencies,
never runtime ones, and importing them costs seconds that tests which do not need them skip.
(A module, not conftest.py, so that test files can import it; the name is unique across tests/.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent.parent / "data"
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
# original_max_position_embeddings 64 with head_dim 16 and theta 1e4 puts rope frequencies in
# all three Llama-3 regimes (kept, smoothed, divided by the factor) at these short lengths.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def perplexity(logits, ids) -> float:
    """exp(mean NLL) of ``ids[1:]`` under ``logits`` [len(ids), V] (row i predicts token i + 1)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(jnp.asarray(logits)[:-1], axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1).mean()
    return float(jnp.exp(nll))


def make_hf_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    if family == "qwen2":  # Qwen2 always has q/k/v bias; untied like Qwen2.5-7B
        return Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e6)
    return LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)


def make_torch_model(family: str, seed: int = 0):
    """A random transformers model; every tensor (norms and biases too) is random so a mix-up
    of any two tensors shows in the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def tiny_tokenizer():
    """A word-level transformers tokenizer: enough to test that tokenizers travel with models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rotate-half -> interleaved)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for a Hugging Face one (stated here independently of the loader)."""
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    i, rest = hf.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_BLOCK[module]}.{kind}"


def write_gguf(path: Path, arch: str, cfg: dict, tensors: dict[str, np.ndarray],
               types: dict[str, object] | None = None, extra: dict[str, np.ndarray] = ()):
    """Write a GGUF the way llama.cpp's converter would: ``{arch}.*`` metadata, GGUF names, q/k
    rows permuted for llama. ``tensors`` are HF-named float32 arrays, or already-quantised uint8
    blocks (GGUF order) when ``types`` names a quant type for them."""
    import gguf

    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, x in tensors.items():
        qtype = types.get(name, gguf.GGMLQuantizationType.F32)
        if x.dtype == np.uint8:  # pre-made blocks
            w.add_tensor(gguf_name(name), x, raw_dtype=qtype)
            continue
        if arch == "llama" and name.split(".")[-2] in heads:
            x = llama_cpp_permute(x, heads[name.split(".")[-2]])
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), x.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), x.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in dict(extra).items():
        w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())

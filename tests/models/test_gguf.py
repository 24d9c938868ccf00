"""GGUF loading: the embedded SmolLM2 against transformers' own GGUF loader, perplexity on real
English, and synthetic GGUF files written like llama.cpp's converter writes them (every supported
quant type, q/k permutation, Qwen2 biases, Llama-3.1 rope_freqs)."""
from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tests.models.loader_testutil import (llama_cpp_permute, perplexity, torch_logits,
                                           write_gguf)

from pagedjax.models import ModelConfig, RopeScaling, forward_dense, load_model
from pagedjax.models.gguf_loader import load_gguf
from pagedjax.models.params import flatten, is_norm, param_shapes

# ---------------------------------------------------------------- the embedded SmolLM2 GGUF


def test_smollm2_config_matches_transformers(smollm2, smollm2_transformers):
    ours, theirs = smollm2.cfg, smollm2_transformers.config
    assert ours.family == "llama"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert smollm2.tokenizer is not None and smollm2.tokenizer.vocab_size == ours.vocab_size


def test_smollm2_logits_match_transformers(smollm2, smollm2_transformers, paragraph):
    text_ids = smollm2.tokenizer(paragraph)["input_ids"][:40]
    random_ids = np.random.default_rng(0).integers(0, smollm2.cfg.vocab_size, 40)
    tokens = np.array([text_ids, random_ids], dtype=np.int32)
    ours = np.asarray(forward_dense(smollm2.params, smollm2.cfg, jnp.asarray(tokens)))
    ref = torch_logits(smollm2_transformers, tokens)
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    # Same dequantised weights in fp32 on both sides; 30 layers of differently ordered fp32
    # reductions leave 4e-6 (measured); a wrong q/k permutation or rope gives errors of order 1.
    print(f"\nSmolLM2 GGUF: relative logit error vs transformers {err:.2e}")
    assert err <= 1e-3, f"relative logit error {err:.2e}"


def test_smollm2_perplexity(smollm2, paragraph):
    ids = smollm2.tokenizer(paragraph)["input_ids"]
    logits = forward_dense(smollm2.params, smollm2.cfg, jnp.asarray([ids], dtype=jnp.int32))[0]
    ppl = perplexity(logits, ids)
    print(f"\nSmolLM2-135M-Instruct Q4_1 perplexity on tests/data/paragraph.txt "
          f"({len(ids)} tokens): {ppl:.2f}")
    # Measured 18.53 (175 tokens; pagedjax fp32 on CPU, whose logits match transformers' to
    # 4e-6 relative, so other machines move it by ~1e-4). Failure modes measured on the same
    # text: rope theta 1e4 instead of 1e5: 20.5; q/k rows permuted wrongly: 122; no context
    # (each token alone): 7239; a uniform guess: 49152 (the vocabulary). 20 sits above the
    # measurement with 8% headroom (tokenizer revisions) and below the subtlest failure tried.
    assert ppl < 20.0, f"perplexity {ppl:.2f}"


# ---------------------------------------------------------------- synthetic GGUF files

GGUF_TINY = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 rope_theta=10000.0, rms_norm_eps=1e-5)  # 256-wide rows: K-quant blocks fit


def _tiny_cfg(arch: str) -> ModelConfig:
    return ModelConfig.from_hf({"model_type": arch, **GGUF_TINY,
                                "tie_word_embeddings": arch == "llama"})


def _random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (1 + 0.1 * rng.standard_normal(shape) if is_norm(name)
                   else rng.standard_normal(shape)).astype(np.float32)
            for name, shape in param_shapes(cfg).items()}


def _rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


# Relative RMS error of each format on Gaussian weights, with ~2x headroom. Any row mix-up (a
# missed or wrong q/k un-permutation) gives ~1.4, far above all of them.
ROUNDTRIP_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1.5e-2, Q.Q4_0: 0.2,
                 Q.Q4_1: 0.2}


@pytest.mark.parametrize("qtype", list(ROUNDTRIP_TOL), ids=lambda q: q.name)
def test_llama_gguf_roundtrip(tmp_path, qtype):
    cfg = _tiny_cfg("llama")
    weights = _random_weights(cfg)
    types = {n: qtype for n, w in weights.items() if w.ndim == 2}
    path = write_gguf(tmp_path / "tiny.gguf", "llama", GGUF_TINY, weights, types)
    got_cfg, params = load_gguf(path, "float32")
    assert got_cfg.tie_word_embeddings and not got_cfg.attention_bias
    heads = (got_cfg.num_attention_heads, got_cfg.num_key_value_heads, got_cfg.head_dim)
    assert heads == (4, 2, 64)
    got = flatten(params)
    assert set(got) == set(weights)
    for name, w in weights.items():
        err = _rel_rms(got[name], w)
        assert err <= ROUNDTRIP_TOL[types.get(name, Q.F32)], f"{name}: {err:.3g}"


def _random_k_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (the gguf package cannot quantise K types)."""
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # block_q4_K: d, dmin (fp16) first
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # block_q6_K: ql, qh, scales, then d (fp16) last
        blocks[..., 208:210] = scale
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_llama_gguf_k_quants(tmp_path, qtype):
    cfg = _tiny_cfg("llama")
    rng = np.random.default_rng(0)
    weights, types, expected = {}, {}, {}
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, w in _random_weights(cfg).items():
        if w.ndim == 1:
            weights[name] = expected[name] = w
            continue
        weights[name] = _random_k_blocks(rng, *w.shape, qtype)
        types[name] = qtype
        stored = gguf.quants.dequantize(weights[name], qtype)  # GGUF (permuted) row order
        proj = name.split(".")[-2]
        if proj in heads:  # the HF rows are those the converter permuted into `stored`
            order = llama_cpp_permute(np.arange(w.shape[0])[:, None], heads[proj])[:, 0]
            stored = _unperm(stored, order)
        expected[name] = stored
    path = write_gguf(tmp_path / "k.gguf", "llama", GGUF_TINY, weights, types)
    got = flatten(load_gguf(path, "float32")[1])
    for name, want in expected.items():
        assert np.all(np.isfinite(want))
        np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)


def _unperm(stored: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(stored)
    out[order] = stored  # stored[i] is HF row order[i]
    return out


def test_qwen2_gguf_biases_and_no_permutation(tmp_path):
    cfg = _tiny_cfg("qwen2")
    assert cfg.attention_bias and not cfg.tie_word_embeddings
    weights = _random_weights(cfg, seed=3)
    path = write_gguf(tmp_path / "qwen.gguf", "qwen2", GGUF_TINY, weights)
    loaded = load_model(str(path), dtype="float32")
    assert loaded.tokenizer is None  # no tokenizer.ggml.* metadata in this file
    # GGUF stores floats as float32; the rest of the config must come through exactly.
    want = dataclasses.replace(cfg, rms_norm_eps=float(np.float32(cfg.rms_norm_eps)))
    assert dataclasses.replace(loaded.cfg, name="") == want
    got = flatten(loaded.params)
    for name, w in weights.items():
        np.testing.assert_array_equal(np.asarray(got[name]), w, err_msg=name)


def _llama_cpp_rope_freqs(head_dim, theta, factor, low, high, orig) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor, ok", [(8.0, True), (32.0, True), (5.0, False)])
def test_llama31_rope_freqs(tmp_path, factor, ok):
    meta = {**GGUF_TINY, "rope_theta": 500000.0, "max_position_embeddings": 131072}
    cfg = ModelConfig.from_hf({"model_type": "llama", **meta, "tie_word_embeddings": True})
    extra = {"rope_freqs.weight": _llama_cpp_rope_freqs(64, 500000.0, factor, 1.0, 4.0, 8192)}
    path = write_gguf(tmp_path / "l31.gguf", "llama", meta, _random_weights(cfg), extra=extra)
    if not ok:
        with pytest.raises(ValueError, match="rope_freqs.weight"):
            load_gguf(path, "float32")
        return
    got_cfg, _ = load_gguf(path, "float32")
    assert got_cfg.rope_scaling == RopeScaling(factor, 1.0, 4.0, 8192)

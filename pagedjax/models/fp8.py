"""FP8 weights (W8A8, vLLM's ``--quantization fp8``): float8_e4m3fn linear weights with a float32
scale per output channel, activations quantised per token inside the step.

A quantised linear keeps its Hugging Face names: ``weight`` [out, in] float8_e4m3fn and
``weight_scale`` [out] float32 (compressed-tensors' and vLLM's name), with
``w ~= weight * weight_scale[:, None]``. A fused projection (weight [R, O, D],
pagedjax/models/fused.py) carries [R, O] scales: per-channel scales fuse by the same concatenation
as the rows, and shard with them under tensor parallelism.

Why this arithmetic: with x ~= s_x[t] * xq[t, :] (a scale per token) and w ~= s_w[o] * wq[o, :],
``y[t, o] = s_x[t] * s_w[o] * sum_d xq[t, d] * wq[o, d]``: the scales factor out of the sum, so the
matmul itself is a dot of two float8 operands accumulated in float32 (Hopper's FP8 tensor cores:
XLA's GPU gemm rewriter turns a dot whose operands are f8 into a cuBLASLt FP8 GEMM, custom call
``__cublas$lt$matmul$f8``, with the weight [out, in] as the "TN" operand cuBLASLt wants), and the
scales are one multiply of the [T, O] output. On the CPU XLA upcasts the operands: the same
numbers, slower. Per-token activation scales are computed in the step (amax / 448, "dynamic"), so
nothing is calibrated and a checkpoint's static ``input_scale`` is not needed.

That is the form for prefill-sized steps. A decode-sized step is a weight read, and there the
activations stay in the model's dtype (W8A16: ``y = (x . wq^T) * s_w``, the fp8 weight converted
to bf16 on the way into the matmul): the same weight bytes,
no quantisation pass, no float32 output. ``choose_path`` picks by the step's rows.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("fp8",)
FP8 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn; a larger value would convert to NaN
# The linear layers that run in fp8. The LM head stays in the model's dtype: it is 7% of
# Qwen2.5-7B's weight bytes and its logits feed sampling directly (vLLM leaves it unquantised
# too); True quantises an untied lm_head the same way (a tied one is the embedding table).
# The fused names are the engine's (pagedjax/models/fused.py): q/k/v and gate/up quantise alike
# either way.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")
QUANTIZE_LM_HEAD = False


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization!r} is not supported; use one of "
                         f"{QUANTIZATIONS} (or leave it unset for the checkpoint's own weights)")


def is_quantized_linear(name: str) -> bool:
    """Whether the Hugging Face tensor ``name`` is a weight that --quantization fp8 quantises."""
    if name == "lm_head.weight":
        return QUANTIZE_LM_HEAD
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEARS


def linear_sizes(cfg) -> tuple[int, int]:
    """(weights, output rows) of the linears --quantization fp8 quantises, for memory sizing."""
    d, f, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    qkv = (n + 2 * cfg.num_key_value_heads) * h
    weights = cfg.num_hidden_layers * (qkv * d + n * h * d + 3 * f * d)
    rows = cfg.num_hidden_layers * (qkv + d + 2 * f + d)  # q/k/v, o, gate/up, down
    if QUANTIZE_LM_HEAD and not cfg.tie_word_embeddings:
        weights, rows = weights + cfg.vocab_size * d, rows + cfg.vocab_size
    return weights, rows


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix("weight") + "weight_scale"


def quantize(x, axis: int = -1):
    """(xq float8_e4m3fn, scale float32) with x ~= xq * scale: one scale per slice along ``axis``
    (kept as a size-1 dim), amax / 448, so the largest |value| of each slice maps to 448. An
    all-zero slice gets scale 1."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    # clip: x / scale can round a hair past 448, and float8_e4m3fn has no inf to round to
    xq = jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(FP8)
    return xq, scale


@jax.jit
def quantize_weight(w):
    """w [..., out, in] -> (weight [..., out, in] float8_e4m3fn, weight_scale [..., out] float32),
    one scale per output channel."""
    wq, scale = quantize(w, axis=-1)
    return wq, scale[..., 0]


def dequantize_weight(p) -> jax.Array:
    """A linear's weight in float32, whichever form ``p`` ({"weight", "weight_scale"?}) holds."""
    w = p["weight"].astype(jnp.float32)
    if "weight_scale" in p:
        w = w * p["weight_scale"][..., None]
    return w


# How a linear runs, chosen by its rows T (static at trace time: step programs are bucketed).
# Up to SMALL_T_MAX rows a step is a weight read: W8A16 (x stays bf16, the fp8 weight converted
# inside the matmul) reads the same fp8 bytes with no activation pass and no float32 output
# pass, and XLA emits no FP8 GEMM that small anyway. Above it the FP8 GEMM's tensor-core rate
# pays: "w8a8_out" lets its output be the linear's dtype (bf16: half the bytes of the float32
# [T, O] array the scale multiply reads back). Set from benchmarks/experiments/fp8_gemm.py (at
# bad3159) on the H100: at 1, 8 and 32 rows XLA's W8A16 fusion beat a Pallas kernel of the same
# arithmetic (fp8_matmul_gpu.py beside it) on o_proj and gate_up_proj.
SMALL_T_MAX = 64
SMALL_T_PATH = "w8a16"
LARGE_T_PATH = "w8a8_out"
PATHS = ("w8a8", "w8a8_out", "w8a16")


def choose_path(rows: int) -> str:
    """The form of a linear of ``rows`` token rows (see SMALL_T_MAX)."""
    return SMALL_T_PATH if rows <= SMALL_T_MAX else LARGE_T_PATH


def fp8_linear(x, weight, weight_scale, out_dtype=None, path: str | None = None):
    """x [..., D] by a quantised weight [*W, D] (W: [O] or a fused [R, O]), scales [*W]:
    returns [..., *W] in ``out_dtype`` (default x's dtype). ``path`` (default ``choose_path``
    of the rows): "w8a8" quantises x per row here, in the step, and runs an f8 x f8 dot into
    float32; "w8a8_out" the same dot emitting ``out_dtype``; "w8a16" keeps x and converts the
    weight inside the dot."""
    lead, d = x.shape[:-1], x.shape[-1]
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, d)  # [T, D]
    w = weight.reshape(-1, d)  # [*W, D] -> [O', D]: contiguous, free
    s_w = weight_scale.reshape(1, -1)  # [1, O']
    path = path or choose_path(x2.shape[0])
    if path == "w8a16":
        # x [T, D] . w [O', D] over D with the weight converted to x's dtype: XLA fuses the
        # convert into the dot's operand read where it can
        y = jax.lax.dot_general(x2, w.astype(x2.dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * s_w
    elif path in ("w8a8", "w8a8_out"):
        xq, x_scale = quantize(x2)  # [T, D], [T, 1]
        # both operands float8: XLA's GPU gemm rewriter makes it a cuBLASLt FP8 GEMM
        acc = jnp.float32 if path == "w8a8" else out_dtype
        y = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        y = y.astype(jnp.float32) * x_scale * s_w
    else:
        raise ValueError(f"fp8 linear path {path!r} is not one of {PATHS}")
    return y.reshape(*lead, *weight.shape[:-1]).astype(out_dtype)


def quantize_tensor(name: str, x) -> dict[str, Any]:
    """{name: x} for a tensor --quantization fp8 leaves alone, else {name: weight, name_scale:
    weight_scale}: what a loader stores for one tensor it has read."""
    if not is_quantized_linear(name):
        return {name: x}
    wq, scale = quantize_weight(x)
    return {name: wq, scale_name(name): scale}


def _linears(params) -> list[dict]:
    """Every dict of ``params`` that holds a linear's "weight" --quantization fp8 quantises."""
    found = []

    def walk(node, name):
        if isinstance(node, dict):
            if is_quantized_linear(name + ".weight") and "weight" in node:
                found.append(node)
            for key, child in node.items():
                walk(child, f"{name}.{key}" if name else key)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{name}.{i}")

    walk(params, "")
    return found


def quantize_params(params, *, consume: bool = False):
    """A copy of the tree with every linear quantised (dicts copied, other leaves shared), one
    tensor at a time; ``consume`` deletes each original right after its fp8 copy exists, which
    keeps the peak near the weights plus one tensor. Fused (pagedjax/models/fused.py) and unfused
    layouts both work; linears already in fp8 are kept."""
    def copy(node):
        if isinstance(node, dict):
            return {k: copy(v) for k, v in node.items()}
        if isinstance(node, list):
            return [copy(v) for v in node]
        return node

    params = copy(params)
    for p in _linears(params):
        if "weight_scale" in p:
            continue
        w = p["weight"]
        p["weight"], p["weight_scale"] = jax.block_until_ready(quantize_weight(w))
        if consume and isinstance(w, jax.Array):
            w.delete()
    return params


def is_fp8(params) -> bool:
    """Whether any linear in ``params`` is stored in fp8."""
    return any("weight_scale" in p for p in _linears(params))

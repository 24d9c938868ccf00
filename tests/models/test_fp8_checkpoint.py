"""Checkpoints already in FP8 (pagedjax/models/fp8_checkpoint.py), written here with safetensors in
the two formats: compressed-tensors ``float-quantized`` with per-channel scales and vLLM's ``fp8``
with per-tensor scales. Unsupported schemes are refused by name."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tests.models.loader_testutil import make_torch_model
from tests.models.test_fp8 import ALL_W8A8, pin_paths  # noqa: F401 - pin_paths: a fixture

from pagedjax import LLM, SamplingParams
from pagedjax.models import fp8, load_model
from pagedjax.models.params import flatten
from pagedjax.planning.memory_report import weights_bytes
from pagedjax.planning.model_source import resolve_model

LINEAR_SUFFIXES = tuple(f"{n}.weight" for n in fp8.LINEARS)

COMPRESSED = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                              "symmetric": True, "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                        "dynamic": True}}}}
VLLM_FP8 = {"quant_method": "fp8", "activation_scheme": "static"}


def write_fp8_checkpoint(folder, model, qconfig: dict, per_channel: bool, scale_name: str,
                         input_scale: bool = False) -> dict:
    """Save ``model`` with its linears (not lm_head) as float8_e4m3fn + scales; returns the
    {name: (fp8 weight, [out] scale)} written, as numpy."""
    import torch
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": qconfig}))
    tensors, written = {}, {}
    for name, w in model.state_dict().items():
        if not name.endswith(LINEAR_SUFFIXES):
            tensors[name] = w.clone()  # float32: only the linears differ from the float model
            continue
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = (amax / 448.0).float()
        q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        base = name.removesuffix("weight")
        tensors[name] = q
        tensors[base + scale_name] = scale if per_channel else scale.reshape(())
        if input_scale:
            tensors[base + "input_scale"] = torch.ones(())
        written[name] = (q.view(torch.uint8).numpy(),
                         np.broadcast_to(scale.numpy().reshape(-1), (w.shape[0],)))
    save_file(tensors, str(folder / "model.safetensors"))
    return written


def _check_loaded(loaded, written):
    flat = flatten(loaded.params)
    assert loaded.quantization == "fp8"
    for name, (q, scale) in written.items():
        got = flat[name]
        assert got.dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), q)
        np.testing.assert_array_equal(flat[fp8.scale_name(name)], scale)
    assert flat["model.embed_tokens.weight"].dtype == jnp.float32  # the rest at --dtype


def test_compressed_tensors_per_channel(tmp_path):
    """Read as written, and the same model as a bf16 checkpoint quantised at load (the same
    per-channel amax / 448 rule) gives the same weights and the same greedy tokens."""
    model = make_torch_model("qwen2", seed=5)
    written = write_fp8_checkpoint(tmp_path / "ct", model, COMPRESSED, True, "weight_scale")
    loaded = load_model(str(tmp_path / "ct"), dtype="float32")  # fp8 without being asked
    _check_loaded(loaded, written)
    model.save_pretrained(tmp_path / "plain")
    ours = load_model(str(tmp_path / "plain"), dtype="float32", quantization="fp8")
    for name in written:
        a, b = flatten(loaded.params), flatten(ours.params)
        np.testing.assert_array_equal(np.asarray(a[name]).view(np.uint8),
                                      np.asarray(b[name]).view(np.uint8))
        np.testing.assert_allclose(a[fp8.scale_name(name)], b[fp8.scale_name(name)], rtol=1e-6)
    prompt = np.random.default_rng(0).integers(0, 256, size=20).tolist()
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = dict(num_gpu_blocks_override=16, max_model_len=64)
    a = LLM(model=str(tmp_path / "ct"), dtype="float32", **engine)
    assert a.engine.config.quantization == "fp8"
    b = LLM(loaded=ours, quantization="fp8", **engine)
    assert (a.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
            == b.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)


def test_vllm_fp8_per_tensor_scales(tmp_path, pin_paths):
    """quant_method fp8 with one scale per tensor (and static input scales, not read): the
    scale is broadcast to every channel; the logits are transformers' with the stored weights
    (dequantised) and the same per-token rounding of the activations."""
    pin_paths(ALL_W8A8)  # 24 rows would run W8A16; the reference rounds the activations
    model = make_torch_model("llama", seed=6)
    written = write_fp8_checkpoint(tmp_path, model, VLLM_FP8, False, "weight_scale",
                                   input_scale=True)
    loaded = load_model(str(tmp_path), dtype="float32")
    _check_loaded(loaded, written)
    import torch
    from tests.models.loader_testutil import torch_logits
    from tests.models.test_fp8 import torch_fake_quant_reference

    from pagedjax.models import forward_dense

    tokens = np.random.default_rng(1).integers(0, 256, size=(1, 24), dtype=np.int32)
    ours = np.asarray(forward_dense(loaded.params, loaded.cfg, jnp.asarray(tokens)))
    stored = {name.removesuffix(".weight"): torch.from_numpy(
        q.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale[:, None])
        for name, (q, scale) in written.items()}
    ref = torch_logits(torch_fake_quant_reference(model, stored), tokens)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-3, err


def test_weight_scale_inv_is_a_multiplier(tmp_path):
    model = make_torch_model("llama", seed=7)
    written = write_fp8_checkpoint(tmp_path, model, {"quant_method": "fp8"}, True,
                                   "weight_scale_inv")
    _check_loaded(load_model(str(tmp_path), dtype="float32"), written)


def test_planner_counts_an_fp8_checkpoint(tmp_path):
    model = make_torch_model("qwen2", seed=5)
    write_fp8_checkpoint(tmp_path, model, COMPRESSED, True, "weight_scale")
    res = resolve_model(str(tmp_path))
    assert res.quantization == "fp8"
    loaded = load_model(str(tmp_path), dtype="float32")
    held = sum(x.nbytes for x in jax.tree.leaves(loaded.params))
    assert weights_bytes(res.cfg, "float32", 1, res.quantization) == held


@pytest.mark.parametrize("qconfig, match", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({**COMPRESSED, "format": "pack-quantized"}, "'pack-quantized' is not supported"),
    ({**COMPRESSED, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                                        "strategy": "block"}}}},
     "'block'.*block-wise"),
    ({**COMPRESSED, "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                                                        "strategy": "group"}}}},
     "4-bit int"),
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
])
def test_unsupported_schemes_are_refused_by_name(tmp_path, qconfig, match):
    model = make_torch_model("llama", seed=8)
    model.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qconfig}))
    with pytest.raises(ValueError, match=match):
        load_model(str(tmp_path), dtype="float32")
    with pytest.raises(ValueError, match=match):
        resolve_model(str(tmp_path))


def test_block_scales_in_the_tensors_are_refused(tmp_path):
    """A config that claims per-tensor scales but ships [out/2, in/2] ones: named, not misread."""
    import torch
    from safetensors.torch import save_file

    model = make_torch_model("llama", seed=9)
    write_fp8_checkpoint(tmp_path, model, VLLM_FP8, True, "weight_scale")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight_scale"
    out, inp = tensors["model.layers.0.mlp.down_proj.weight"].shape
    tensors[name] = torch.ones(out // 2, inp // 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj.weight_scale.*block-wise"):
        load_model(str(tmp_path), dtype="float32")

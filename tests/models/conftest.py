"""Fixtures for the loader tests (helpers live in loader_testutil.py)."""
from __future__ import annotations

from pathlib import Path

import jax
import pytest
from tests.models.loader_testutil import DATA, make_torch_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Parity is about fp32 numbers: on GPUs JAX's default fp32 matmul uses TF32 (errors of
    1e-3 measured on an H100); "highest" keeps these tests meaningful on any backend."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{name: (folder, torch model)}: Qwen2 single-file with a tokenizer, Llama single-file,
    Llama sharded into many safetensors files with an index."""
    out = {}
    for name, family, shard in (("qwen2", "qwen2", None), ("llama", "llama", None),
                                ("llama_sharded", "llama", "40KB")):
        folder = tmp_path_factory.mktemp(name)
        model = make_torch_model(family, seed=len(out))
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
        if name == "qwen2":
            tiny_tokenizer().save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct through pagedjax, float32 (loads in ~10 s)."""
    from pagedjax.models import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2):
    """transformers' own GGUF loading of the same file (~15 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(smollm2.source)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def paragraph() -> str:
    return (DATA / "paragraph.txt").read_text().strip()

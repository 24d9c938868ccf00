"""Models whose config declares a sliding window (Mistral; Qwen2 with use_sliding_window) give
transformers' logits over sequences longer than the window: the engine's bounded-KV mask with no
sinks is the same attention (pagedjax.kernels.reference.visible)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.loader_testutil import TINY, torch_logits

from pagedjax.models import forward_dense, load_model

WINDOW = 16


def _torch_model(family: str):
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    torch.manual_seed(3)
    cfg = (MistralConfig(**TINY, sliding_window=WINDOW) if family == "mistral" else
           Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=0))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_logits_match_transformers(family, tmp_path):
    model = _torch_model(family)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.cfg.sliding_window == WINDOW
    tokens = np.random.default_rng(0).integers(0, loaded.cfg.vocab_size, (2, 48), np.int32)
    ref = torch_logits(model, tokens)
    ours = np.asarray(forward_dense(loaded.params, loaded.cfg, jnp.asarray(tokens)))
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"relative logit error {err:.2e}"
    full = np.asarray(forward_dense(loaded.params, loaded.cfg, jnp.asarray(tokens), window=0))
    assert np.max(np.abs(full - ref)) / np.max(np.abs(ref)) > 1e-2  # the window matters

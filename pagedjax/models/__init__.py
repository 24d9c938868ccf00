"""Functional Flax-style decoders (Llama, Qwen2) and their checkpoint loaders."""
from .config import ModelConfig, RopeScaling
from .decoder import StepMeta, forward_dense, forward_paged
from .loader import LoadedModel, load_model

__all__ = ["ModelConfig", "RopeScaling", "StepMeta", "forward_dense", "forward_paged",
           "LoadedModel", "load_model"]

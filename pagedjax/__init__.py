"""pagedjax: a KV-cache-aware LLM inference engine in JAX and Pallas."""
from .config import EngineArgs
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]

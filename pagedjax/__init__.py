"""pagedjax: a KV-cache-aware LLM inference engine in JAX and Pallas."""
from .beam_search import BeamSearchOutput, BeamSearchParams
from .config import EngineArgs
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["BeamSearchOutput", "BeamSearchParams", "LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]

"""pagedjax: a KV-cache-aware LLM inference engine in JAX and Pallas."""
import importlib

# Loaded on first use, so that the CLI can check a command's flags before JAX and the engine are
# imported (a bad flag fails at once, not after seconds of imports).
_EXPORTS = {"BeamSearchOutput": ".core.beam_search", "BeamSearchParams": ".core.beam_search",
            "EngineArgs": ".config", "LLM": ".entrypoints.llm", "CompletionOutput": ".outputs",
            "RequestOutput": ".outputs", "SamplingParams": ".sampling_params"}

__all__ = ["BeamSearchOutput", "BeamSearchParams", "LLM", "EngineArgs", "SamplingParams",
           "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagedjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value

"""Paged-attention kernels (Pallas) and their pure-jnp references (installed as pagedjax.kernels)."""
if __name__ == "kernels":
    # Run from a checkout (`python -m pytest`, `python -m benchmarks`), the repository root is on
    # sys.path and this folder shadows the `kernels` distribution that transformers imports. Hand
    # the name over to that distribution, or fail as a missing module would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real
    _spec.loader.exec_module(_real)
else:
    from .quantization import QuantizedPages, dequantize_pages, quantize_pages
    from .reference import paged_attention_ref, token_positions, write_kv_ref

    __all__ = ["QuantizedPages", "dequantize_pages", "paged_attention_ref", "quantize_pages",
               "token_positions", "write_kv_ref"]

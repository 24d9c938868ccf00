"""Paged-attention kernels (Pallas) and their pure-jnp references."""
from .quantization import QuantizedPages, dequantize_pages, quantize_pages
from .reference import paged_attention_ref, token_positions, write_kv_ref

__all__ = ["QuantizedPages", "dequantize_pages", "paged_attention_ref", "quantize_pages",
           "token_positions", "write_kv_ref"]

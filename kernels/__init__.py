"""Paged-attention kernels (Pallas) and their pure-jnp references."""
from .reference import paged_attention_ref, token_positions, write_kv_ref

__all__ = ["paged_attention_ref", "token_positions", "write_kv_ref"]

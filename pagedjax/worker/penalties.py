"""Repetition, presence and frequency penalties and min_tokens, applied on the device before the
draw, with vLLM's semantics: the repetition penalty (Hugging Face's) divides the positive logits
and multiplies the negative ones of every token in the prompt or the output; the presence and
frequency penalties (OpenAI's) subtract ``presence`` once and ``frequency`` per occurrence for
every token of the output; min_tokens bans EOS and the stop token ids until that many tokens are
out. Logprobs stay those of the model's own distribution (vLLM's default, raw logprobs).

Only a step with a row that uses them pays: the host then sends one int32 array [S, PARAMS + L]
(L: a power-of-two bucket of the longest row), per row its parameters and its token codes: a
prompt token t as t, an output token as V + t, a stop token min_tokens still bans as 2V + t,
padding -1. With async scheduling a decode row's newest output token is not on the host yet: it
is the token the previous step sampled, so the row names that step's output row and the device
reads it there, as the model step reads its input token.

A row's result depends on its own codes only (scatters into its own row, exact integer counts),
so it samples the same token in any batch; a row that uses none of this is left bit-identical
(it divides by 1 and subtracts 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PARAMS = 4  # repetition, presence, frequency (float32 bits), pending row (-1: none)


def row_codes(seq, vocab_size: int, stop_ids: frozenset[int]) -> np.ndarray | None:
    """The token codes of a sampling row for ``seq``, or None when nothing acts on its logits.
    ``stop_ids``: the model's EOS ids; min_tokens bans them with the request's stop_token_ids."""
    p = seq.params
    outputs = seq.output_token_ids  # trailing PLACEHOLDERs: sampled by a step on the device
    banning = len(outputs) < p.min_tokens
    if not (p.penalized or banning):
        return None
    parts = []
    if p.repetition_penalty != 1.0:
        parts.append(np.asarray(seq.prompt_token_ids, np.int32))
    if p.penalized:
        parts.append(np.asarray(outputs[:len(outputs) - seq.num_pending], np.int32) + vocab_size)
    if banning:
        banned = sorted(stop_ids | set(p.stop_token_ids))
        parts.append(np.asarray(banned, np.int32) + 2 * vocab_size)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def pack(rows: list[tuple[int, object, np.ndarray, int]], num_rows: int) -> np.ndarray:
    """[num_rows, PARAMS + L] int32 from (row, params, codes, pending row) per penalized row;
    the other rows get neutral parameters and no codes."""
    longest = max(len(c) for _, _, c, _ in rows)
    L = max(16, 1 << max(longest - 1, 0).bit_length())
    out = np.full((num_rows, PARAMS + L), -1, np.int32)
    f = out[:, :3].view(np.float32)
    f[:, 0], f[:, 1:3] = 1.0, 0.0
    for row, p, codes, pending in rows:
        f[row] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        out[row, 3] = pending
        out[row, PARAMS:PARAMS + len(codes)] = codes
    return out


def apply(logits, marks, prev_tokens):
    """logits [S, V] float32; marks [S, PARAMS + L] from ``pack``; prev_tokens: the previous
    step's sampled tokens (read at a row's pending row). Returns the logits the draw uses."""
    S, V = logits.shape
    params = jax.lax.bitcast_convert_type(marks[:, :3], jnp.float32)
    repetition, presence, frequency = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    pending = marks[:, 3]
    newest = jnp.where(pending >= 0,
                       prev_tokens[jnp.clip(pending, 0, prev_tokens.shape[0] - 1)] + V, -1)
    codes = jnp.concatenate([marks[:, PARAMS:], newest[:, None]], axis=1)
    kind = jnp.where(codes >= 0, codes // V, -1)
    token = codes - jnp.maximum(kind, 0) * V
    rows = jnp.arange(S)[:, None]

    def where(k):  # the codes of kind k; the others point past the vocabulary and are dropped
        return rows, jnp.where(kind == k, token, V)

    in_prompt = jnp.zeros((S, V), bool).at[where(0)].set(True, mode="drop")
    counts = jnp.zeros((S, V), jnp.int32).at[where(1)].add(1, mode="drop")
    banned = jnp.zeros((S, V), bool).at[where(2)].set(True, mode="drop")
    seen = in_prompt | (counts > 0)
    x = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
    x = x - frequency * counts - presence * (counts > 0)
    return jnp.where(banned, -jnp.inf, x)

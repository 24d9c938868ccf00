"""The tokenizer a GGUF file describes, built with the ``tokenizers`` library (no torch).

A GGUF has no ``tokenizer.json``: llama.cpp stores the vocabulary, merges, token types and special
token ids as ``tokenizer.ggml.*`` metadata. transformers reads that metadata through a reader that
imports torch, which pagedjax does not depend on, so we rebuild the same tokenizer here, piece by
piece as transformers builds it (a test holds the ids and decoded text identical on the embedded
SmolLM2 and on a SentencePiece vocabulary). Two tokenizer kinds cover the models pagedjax runs:

- ``gpt2``: byte-level BPE with the merges in the file (SmolLM2, Qwen2/2.5, Llama 3);
- ``llama``: SentencePiece BPE with byte fallback (Llama 2); the file stores scores instead of
  merges, so the merges are recovered from the vocabulary, best score first.

The result is wrapped in transformers' ``PreTrainedTokenizerFast`` (torch-free), so the chat
template, ``decode`` and the special token ids work as for any Hugging Face tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

KINDS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# The text splits of the pre-tokenizers whose merges were learned on them (llama.cpp's
# ``tokenizer.ggml.pre``); any other keeps GPT-2's split, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
          "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
          "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def load_gguf_tokenizer(path: str | Path, reader: GGUFReader | None = None):
    """A ``PreTrainedTokenizerFast`` with the file's vocabulary, special tokens and chat template.

    ValueError if the file has no tokenizer or one of a kind pagedjax does not build."""
    reader = reader or GGUFReader(path)

    def meta(key: str, default=None):
        f = reader.get_field(f"tokenizer.{key}")
        return default if f is None else f.contents()

    tokens, kind = meta("ggml.tokens"), meta("ggml.model")
    if tokens is None:
        raise ValueError(f"{path}: the GGUF file has no tokenizer.ggml.* metadata; pass a "
                         "tokenizer (a Hugging Face folder or hub id) explicitly")
    if kind not in KINDS:
        raise ValueError(f"{path}: GGUF tokenizer kind {kind!r} is not supported; pagedjax builds "
                         f"{list(KINDS)}. Pass a Hugging Face tokenizer (folder or hub id) instead")
    types = meta("ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in meta("ggml.merges", [])]
    if kind == "gpt2":
        tok = _byte_level(tokens, merges, meta("ggml.pre"))
    else:
        tok = _sentencepiece(tokens, merges or None, meta("ggml.scores"))
    byte_alphabet = set(_bytes_to_unicode().values())
    # Control tokens (``<|im_end|>``) are special and matched whole; user-defined ones (``<think>``)
    # are matched whole too but not special. A byte-level control token spelled outside the byte
    # alphabet is a converter mislabel, skipped as transformers skips it.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL
                            and (kind != "gpt2" or set(t) <= byte_alphabet)])
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    ids = {name: meta(f"ggml.{key}") for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(meta("ggml.add_bos_token", kind == "llama")) and ids["bos_token"] is not None
    add_eos = bool(meta("ggml.add_eos_token", False)) and ids["eos_token"] is not None
    tok.post_processor = _template(tokens, ids["bos_token"] if add_bos else None,
                                   ids["eos_token"] if add_eos else None)
    return _fast_tokenizer_class()(
        tokenizer_object=tok, chat_template=meta("chat_template"), add_bos_token=add_bos,
        add_eos_token=add_eos, clean_up_tokenization_spaces=False, name_or_path=str(path),
        **{name: tokens[i] for name, i in ids.items() if i is not None})


def _fast_tokenizer_class():
    """transformers' PreTrainedTokenizerFast. Imported without torch, transformers warns that
    "models won't be available": true and beside the point here (only its tokenizer class is
    used), so that one import is kept quiet on the torch-free install."""
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        from transformers import PreTrainedTokenizerFast
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before
    return PreTrainedTokenizerFast


def _byte_level(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> Tokenizer:
    """GPT-2 style BPE over bytes spelled as printable characters."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token written in plain text rather than in the byte alphabet is respelled into it
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], merges: list[tuple[str, str]] | None,
                   scores: list[float]) -> Tokenizer:
    """SentencePiece BPE: spaces are ``▁``, a leading one is added to the first word, and
    characters outside the vocabulary fall back to byte tokens ``<0xNN>``."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces is a merge, ranked by the merged token's
    score (higher merges first), ties by the pieces' lengths, then by their ids."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, score) for left, right in
                   sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _template(tokens: list[str], bos: int | None, eos: int | None):
    """BOS/EOS around each sequence, as the file's add_bos_token/add_eos_token flags say."""
    def seq(name: str, type_id: int) -> list[str]:
        pieces = ([tokens[bos]] if bos is not None else []) + [f"${name}"]
        pieces += [tokens[eos]] if eos is not None else []
        return [f"{p}:{type_id}" for p in pieces]

    special = {tokens[i]: i for i in (bos, eos) if i is not None}
    return processors.TemplateProcessing(single=seq("A", 0), pair=seq("A", 0) + seq("B", 1),
                                         special_tokens=list(special.items()))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (whitespace and control bytes
    move to code points above 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}

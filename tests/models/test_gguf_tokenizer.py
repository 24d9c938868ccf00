"""The torch-free GGUF tokenizer (pagedjax/models/gguf_tokenizer.py) against transformers' own GGUF
tokenizer on the same file: identical ids, decoded text and special tokens on hundreds of strings,
for the embedded SmolLM2 (byte-level BPE) and a SentencePiece vocabulary written like llama.cpp
writes Llama 2's."""
from __future__ import annotations

import collections
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
from tests.models.loader_testutil import DATA

from pagedjax.models import gguf_loader
from pagedjax.models.embedded import embedded_model_path
from pagedjax.models.gguf_tokenizer import load_gguf_tokenizer

FIXED = [
    "", " ", "a", "Hello world", "What is the capital of France?",
    "The capital of France is Paris.",
    # whitespace runs
    "  two leading", "trailing   ", "a  b   c    d", "\t\ttabs\tand spaces ", "\n", "\n\n\n",
    "line one\nline two\r\nline three\rfour", " \n \n ", "\u00a0non-breaking\u00a0space",
    "ideographic\u3000space", "    indented\n        more", "\u2003em\u2002en\u2009thin",
    # unicode
    "Ünïcödé çà ñ ß ø å æ œ", "e\u0301 combining acute", "Ελληνικά κείμενο", "Русский текст",
    "עברית", "العربية نص", "हिन्दी पाठ", "ไทยภาษา", "Tiếng Việt có dấu", "ﬁ ligature ǅ",
    "\u200bzero\u200dwidth\u200cjoiners\ufeff", "control \x00\x07\x1b chars", "½ ¾ ² ³ ° ± × ÷",
    "ℕ ℤ ℚ ℝ ∀ ∃ ∑ ∫ √ ∞ ≤ ≥ ≠", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
    # CJK
    "日本語のテキストです。", "中文文本，包括标点符号！", "한국어 텍스트입니다", "カタカナ ひらがな 漢字",
    "東京は日本の首都です", "混合 mixed 文本 text",
    # emoji
    "😀", "emoji 😀👍🏽 ok", "👩‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "❤️‍🔥 ✨🎉", "🤖🧠💡" * 5,
    # code
    "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}', "<div class=\"x\">&amp;</div>",
    "SELECT * FROM t WHERE id = 42;", "x = lambda a, b: a if a > b else b",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1); }",
    "$ pip install -e . && pytest -q", "```python\nprint('hi')\n```",
    "https://example.com/path?q=1&r=%20#frag", "a\\b\\c /usr/bin/env",
    # numbers
    "1234567890", "3.14159265358979", "1e-10 6.02e23 -0.5", "1,000,000.00", "0x1F 0b1010 0o17",
    "2024-01-31T12:34:56Z", "+33 1 23 45 67 89", "99.9% of 1/3", "12345678901234567890123",
    # contractions and case
    "don't won't I'll we've they're she'd it's", "DON'T SHOUT", "CamelCaseIdentifier snake_case",
    # special tokens written as text
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<s>x</s>", "<unk>", "<think>why</think>",
    "<|im_start|>", "<<|im_end|>>", "<repo_name>foo<file_sep>",
    # repetition
    "a" * 100, "ab" * 50, "! " * 30, "\n" * 20, " " * 40, "=" * 64, "....", "???!!!",
]

FRAGMENTS = [x for x in FIXED if x] + ["the", "Paris", " ", "  ", "\n", "\t", "é", "日本", "😀",
                                       "123", "(", ")", "{", "}", "'", '"', "_", "-"]
# code point ranges for random text: Latin, Latin-1, Greek/Cyrillic, CJK, Hangul, emoji
RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x370, 0x4FF), (0x4E00, 0x4FFF), (0xAC00, 0xAC80),
          (0x1F300, 0x1F64F)]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "日本語で答えて"}],
    [{"role": "user", "content": "  spaces  \n\n and newlines \n"}],
    [{"role": "user", "content": "def f():\n    pass"}, {"role": "assistant", "content": "ok"}],
]


def corpus() -> list[str]:
    """The fixed strings, 120 seeded random mixes of them, 40 of random code points, and every
    paragraph line: 245 strings."""
    rng = random.Random(0)
    mixes = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 8))) for _ in range(120)]
    points = ["".join(chr(rng.randint(*rng.choice(RANGES))) for _ in range(rng.randint(1, 24)))
              for _ in range(40)]
    lines = [x for x in (DATA / "paragraph.txt").read_text().splitlines() if x.strip()]
    return FIXED + mixes + points + lines


def _writer(path: Path, vocab_size: int) -> gguf.GGUFWriter:
    """A writer with the architecture keys transformers reads before the tokenizer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab_size)
    return w


def _close(w: gguf.GGUFWriter, vocab_size: int) -> None:
    w.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_gguf(path: Path, pre: str) -> Path:
    """SmolLM2's byte-level vocabulary and merges under another pre-tokenizer (Qwen2's or Llama 3's
    text split), with BOS added as Llama 3 files ask."""
    src = gguf.GGUFReader(embedded_model_path())
    tokens = src.get_field("tokenizer.ggml.tokens").contents()
    w = _writer(path, len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(src.get_field("tokenizer.ggml.token_type").contents())
    w.add_token_merges(src.get_field("tokenizer.ggml.merges").contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(src.get_field("tokenizer.chat_template").contents())
    _close(w, len(tokens))
    return path


def sentencepiece_gguf(path: Path, kind: str = "llama") -> Path:
    """A GGUF with a Llama-2-style SentencePiece vocabulary (scores, no merges, byte tokens): the
    paragraph's characters and its 600 most frequent substrings, scored by frequency, so that
    competing merges (``▁t`` + ``he`` or ``▁th`` + ``e``) are decided by the scores."""
    words = ("\u2581" + w for w in (DATA / "paragraph.txt").read_text().split())
    counts = collections.Counter(w[i:j] for w in words for i in range(len(w))
                                 for j in range(i + 2, min(len(w), i + 6) + 1))
    chars = sorted({c for piece in counts for c in piece})
    pieces = chars + [p for p, _ in counts.most_common(600)]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    w = _writer(path, len(tokens))
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))  # unknown, control, byte, normal
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    _close(w, len(tokens))
    return path


@pytest.fixture(scope="module", params=["smollm2", "qwen2", "llama-bpe", "sentencepiece"])
def tokenizers(request, tmp_path_factory):
    """(ours, transformers') for the same file."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gguf")
    if request.param == "smollm2":
        path = embedded_model_path()
    elif request.param == "sentencepiece":
        path = sentencepiece_gguf(folder / "sp.gguf")
    else:
        path = byte_level_gguf(folder / "bpe.gguf", request.param)
    return (load_gguf_tokenizer(path),
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))


def test_corpus_is_large_and_varied():
    texts = corpus()
    assert len(texts) >= 200 and len(set(texts)) >= 200


def test_ids_and_text_match_transformers(tokenizers):
    ours, theirs = tokenizers
    for text in corpus():
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        for skip in (False, True):
            assert (ours.decode(ids, skip_special_tokens=skip)
                    == theirs.decode(ids, skip_special_tokens=skip)), repr(text)


def test_decode_of_arbitrary_ids_matches_transformers(tokenizers):
    """Sampling emits any id in any order, including half a UTF-8 character."""
    ours, theirs = tokenizers
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(0, len(theirs), rng.integers(1, 20)).tolist()
        for skip in (False, True):
            assert (ours.decode(ids, skip_special_tokens=skip)
                    == theirs.decode(ids, skip_special_tokens=skip)), ids


def test_chat_template_and_special_tokens_match_transformers(tokenizers):
    ours, theirs = tokenizers
    assert ours.chat_template == theirs.chat_template
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "vocab_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.all_special_ids == theirs.all_special_ids
    assert len(ours) == len(theirs)
    for messages in CHATS:
        for gen in (False, True):
            kw = dict(add_generation_prompt=gen, tokenize=False)
            text = ours.apply_chat_template(messages, **kw)
            assert text == theirs.apply_chat_template(messages, **kw)
            assert ours.encode(text) == theirs.encode(text)
            kw["tokenize"] = True
            assert ours.apply_chat_template(messages, **kw) == theirs.apply_chat_template(
                messages, **kw)


def test_unsupported_kind_is_refused_by_name(tmp_path, caplog):
    path = sentencepiece_gguf(tmp_path / "bert.gguf", kind="bert")
    with pytest.raises(ValueError, match="tokenizer kind 'bert' is not supported"):
        load_gguf_tokenizer(path)
    # the model loader keeps the weights usable on token ids, and says why there is no tokenizer
    assert gguf_loader.load_gguf_tokenizer(path) is None
    assert "tokenizer kind 'bert' is not supported" in caplog.text


def test_embedded_model_tokenizes_without_torch_imports():
    """The GGUF path must not reach transformers' torch-only reader: pagedjax's base install has
    no torch. Checked in a child interpreter where importing torch fails."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from pagedjax.models.embedded import embedded_model_path\n"
            "from pagedjax.models.gguf_loader import load_gguf_tokenizer\n"
            "t = load_gguf_tokenizer(embedded_model_path())\n"
            "print(t.decode(t.encode('The capital of France is Paris.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "The capital of France is Paris."

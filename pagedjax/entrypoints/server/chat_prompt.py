"""A chat's prompt token ids, with what clients wrote kept as text.

A chat template renders the messages into one string that the tokenizer then parses, special
tokens included, so rendered naively a message holding ``<|im_end|>\\n<|im_start|>system`` becomes
real control tokens and any client can forge a system turn. Here message content never yields a
special token:

- a chat with no special-token text in its content is tokenised exactly as ``apply_chat_template``
  does it (the common case: the very same ids);
- one with some is tokenised piecewise: the template is rendered with a marker in place of each
  content, the template's own special tokens (found in the text around the markers) become
  tokens, and the text between them - template text and content together - is tokenised with
  special-token parsing off. That is how the tokenizer itself splits its input around special
  tokens, so only the special-token text in content changes, into the ordinary text it spells.
  The ids are checked to spell what the whole prompt tokenised as text spells (a tokenizer that
  marks the start of its input, as sentencepiece's does, would not); that, or a template that
  rewrites content other than by trimming it, is refused with ``ChatPromptError`` rather than
  guessed at.

``parse_special=True`` (``--parse-special-tokens-in-chat``) skips all this: content is parsed like
the template, at the risk above.
"""
from __future__ import annotations

import re
import uuid


class ChatPromptError(ValueError):
    """The messages cannot be made into a prompt (the client's to fix)."""


def text_messages(messages) -> list[dict[str, str]]:
    """{"role", "content"} dicts of request messages, content parts joined (text only)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatPromptError(f"message content part of type {part.get('type')!r} "
                                          "is not supported: only text")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": m.role, "content": content or ""})
    return out


def chat_prompt_ids(tok, messages: list[dict[str, str]], add_generation_prompt: bool, *,
                    parse_special: bool = False) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"} dicts) under ``tok``'s chat template."""
    specials = _special_texts(tok)
    if not parse_special:
        for m in messages:
            if any(s in m["role"] for s in specials):
                raise ChatPromptError(f"a message role holds special-token text: use a plain "
                                      f"role such as 'user' (got {len(m['role'])} characters)")
        if any(s in m["content"] for m in messages for s in specials):
            return _content_as_text(tok, messages, add_generation_prompt, specials)
    return _render(tok, messages, add_generation_prompt, tokenize=True)


def _special_texts(tok) -> dict[str, int]:
    """The text of every special token -> its id."""
    return {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special and t.content}


def _render(tok, messages, add_generation_prompt: bool, tokenize: bool):
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=tokenize)
    except Exception as e:  # a template that rejects these messages (roles, order)
        raise ChatPromptError(f"the chat template rejected the messages: {e}") from None
    if not tokenize:
        return out
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _content_as_text(tok, messages, add_generation_prompt: bool,
                     specials: dict[str, int]) -> list[int]:
    tag = f"\ue000{uuid.uuid4().hex}"  # private-use characters: no template or client makes it
    marked = [{**m, "content": f"{tag}{i}\ue001"} for i, m in enumerate(messages)]
    parts = re.split(f"{tag}(\\d+)\ue001", _render(tok, marked, add_generation_prompt, False))
    pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
    if len(set(order)) != len(order):
        raise _rewrites()
    rendered = _render(tok, messages, add_generation_prompt, False)
    contents = [messages[i]["content"] for i in order]
    if _join(pieces, contents) != rendered:
        contents = [c.strip() for c in contents]  # templates that `| trim` the content
        if _join(pieces, contents) != rendered:
            raise _rewrites()
    special_ids = set(specials.values())
    ids: list[int] = []
    text = ""  # text since the last template special token: tokenised with specials as text
    for k, piece in enumerate(pieces):
        enc = tok(piece, add_special_tokens=False, return_offsets_mapping=True)
        start = 0
        for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if t in special_ids:
                ids += _as_text(tok, text + piece[start:s])
                ids.append(t)
                text, start = "", e
        text += piece[start:] + (contents[k] if k < len(contents) else "")
    ids += _as_text(tok, text)
    if _spelled(tok, ids) != _spelled(tok, _as_text(tok, rendered)):  # as if all were text
        raise ChatPromptError("this model's tokenizer cannot keep special-token text in message "
                              "content as text: remove it from the messages")
    return ids


def _as_text(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def _spelled(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _join(pieces: list[str], contents: list[str]) -> str:
    return "".join(p + c for p, c in zip(pieces, contents + [""]))


def _rewrites() -> ChatPromptError:
    return ChatPromptError("a message holds special-token text and this model's chat template "
                           "rewrites message content, so it cannot be kept as text: remove the "
                           "special-token text from the messages")

"""Request logs for ``pagedjax plan --requests``: OpenAI completion or chat bodies, one JSON
object per line, tokenised with the model's tokenizer and summarised as prompt-length percentiles,
a recommended ``max_model_len`` and, for multi-turn chats, prompt length by number of user turns.

A line that already says how long its prompt is needs no tokenizer: ``{"prompt_tokens": 812}``,
``{"usage": {"prompt_tokens": 812}}`` (an OpenAI response, as servers log them) or a ``prompt`` of
token ids. Text prompts and chat messages are tokenised (``--tokenizer``, or the model's own).

A line that cannot be read is recorded with its line number and the rest of the log is still read.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedjax.worker.kv_pool import KVPoolSpec

PERCENTILES = (50, 95, 99)


@dataclasses.dataclass(frozen=True)
class LoggedPrompt:
    line: int
    tokens: int
    user_turns: int | None  # chat bodies only
    max_tokens: int | None  # what the request itself asked for, if anything


def _text(content: Any) -> str:
    """Message content as a string; OpenAI's list-of-parts form keeps its text parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError(f"message content must be a string or a list of parts, got "
                     f"{type(content).__name__}")


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_lengths(body: Any, tokenizer) -> list[tuple[int, int | None]]:
    """(prompt tokens, user turns or None) for each prompt in one request body."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    usage = body.get("usage")
    counted = body.get("prompt_tokens",
                       usage.get("prompt_tokens") if isinstance(usage, dict) else None)
    if counted is not None:
        if not isinstance(counted, int) or isinstance(counted, bool) or counted < 1:
            raise ValueError(f"'prompt_tokens' must be a positive integer, got {counted!r}")
        turns = body.get("messages")
        return [(counted, sum(isinstance(m, dict) and m.get("role") == "user" for m in turns)
                 if isinstance(turns, list) else None)]
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        msgs = [{**m, "content": _text(m.get("content"))} for m in msgs]
        kwargs = {"tools": body["tools"]} if body.get("tools") else {}
        ids = _ids(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                 **kwargs))
        return [(len(ids), sum(m.get("role") == "user" for m in msgs))]
    if "prompt" in body:
        p = body["prompt"]
        if isinstance(p, str):
            return [(len(tokenizer.encode(p)), None)]
        if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            return [(len(p), None)]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return [(len(tokenizer.encode(x)), None) for x in p]
        if isinstance(p, list) and p and all(isinstance(x, list) for x in p):
            return [(len(x), None) for x in p]
        raise ValueError("'prompt' must be a string, a list of strings, a list of token ids, "
                         "or a list of token-id lists")
    raise ValueError("neither 'messages' (chat) nor 'prompt' (completion) found")


def read_request_log(path: str | Path, tokenizer) -> tuple[list[LoggedPrompt], list[dict]]:
    """Every prompt of the log, and ``{"line", "error"}`` for each line that could not be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--requests {path}: no such file")
    prompts, errors = [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
                found = prompt_lengths(body, tokenizer)
            except json.JSONDecodeError as e:
                errors.append({"line": n, "error": f"not valid JSON ({e.msg} at column {e.colno})"})
                continue
            except Exception as e:  # a bad body must not stop the report
                errors.append({"line": n, "error": str(e) or type(e).__name__})
                continue
            mt = body.get("max_tokens", body.get("max_completion_tokens"))
            prompts += [LoggedPrompt(n, t, u, mt if isinstance(mt, int) else None)
                        for t, u in found]
    return prompts, errors


def percentile(values: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest logged value with at least p% of values <= it."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summarize(prompts: list[LoggedPrompt], errors: list[dict], *, max_tokens: int,
              spec: "KVPoolSpec", model_max_len: int) -> dict:
    """Percentiles, the recommended ``max_model_len`` (whole blocks of ``spec``) and the share of
    the log it rejects (prompt + max_tokens > max_model_len: what vLLM's OpenAI server refuses)."""
    if not prompts:
        raise ValueError("the request log has no readable request"
                         + (f" ({len(errors)} malformed lines, first at line "
                            f"{errors[0]['line']}: {errors[0]['error']})" if errors else ""))
    lens = [p.tokens for p in prompts]
    pct = {f"p{q}": percentile(lens, q) for q in PERCENTILES}
    wanted = spec.blocks_for(pct["p99"] + max_tokens) * spec.block_size
    recommended = min(wanted, model_max_len)
    rejected = sum(n + max_tokens > recommended for n in lens)
    asked = [p.max_tokens for p in prompts if p.max_tokens is not None]
    out = {
        "requests": len(prompts),
        "malformed_lines": errors,
        "prompt_tokens": {**pct, "mean": sum(lens) / len(lens), "max": max(lens)},
        "max_tokens": max_tokens,
        "recommended_max_model_len": recommended,
        "capped_at_model_max": wanted > model_max_len,
        "rejected": rejected,
        "rejected_share": rejected / len(prompts),
        "requested_max_tokens": ({"p50": percentile(asked, 50), "p99": percentile(asked, 99),
                                  "max": max(asked), "requests": len(asked)} if asked else None),
        "by_user_turns": _by_turns(prompts),
    }
    return out


def _by_turns(prompts: list[LoggedPrompt]) -> list[dict] | None:
    """Prompt tokens grouped by the number of user turns; None unless some chat is multi-turn."""
    chats = [p for p in prompts if p.user_turns is not None]
    if not chats or max(p.user_turns for p in chats) < 2:
        return None
    rows, prev = [], None
    for turns in sorted({p.user_turns for p in chats}):
        lens = [p.tokens for p in chats if p.user_turns == turns]
        mean = sum(lens) / len(lens)
        rows.append({"user_turns": turns, "requests": len(lens), "mean": mean,
                     "growth_vs_previous": None if prev is None else mean - prev,
                     "p50": percentile(lens, 50), "p99": percentile(lens, 99), "max": max(lens)})
        prev = mean
    return rows

"""Engine logprob entries -> OpenAI chat and completions logprob shapes."""

from __future__ import annotations

from typing import Any

# JSON has no -Infinity; a masked token's logprob is reported as this floor instead.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(float(value), _FLOOR) if value == value else _FLOOR  # NaN -> floor


def _top(entry: dict[str, Any]) -> dict[str, Any]:
    token = entry.get("token", "")
    return {"token": token, "logprob": _lp(entry["logprob"]), "bytes": list(token.encode())}


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [...]}``."""
    content = [
        {**_top(e), "top_logprobs": [_top(t) for t in e.get("top_logprobs") or []]}
        for e in entries
    ]
    return {"content": content}


def completion_logprobs(entries: list[dict[str, Any]], text_offset: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a text completion (legacy parallel-list format)."""
    out: dict[str, list[Any]] = {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []
    }
    offset = text_offset
    for entry in entries:
        token = entry.get("token", "")
        out["tokens"].append(token)
        out["token_logprobs"].append(_lp(entry["logprob"]))
        out["top_logprobs"].append(
            {t.get("token", ""): _lp(t["logprob"]) for t in entry.get("top_logprobs") or []}
        )
        out["text_offset"].append(offset)
        offset += len(token)
    return out

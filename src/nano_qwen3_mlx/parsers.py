"""Qwen3 output parsing: ``<think>`` reasoning split and ``<tool_call>`` extraction.

Shared by the HTTP server and the Python API. Qwen3 writes its thinking as
``<think>\\n...\\n</think>\\n\\ncontent``; some chat templates open ``<think>`` in the prompt,
so the generated text starts inside the thinking block without an opening tag.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .tokenizer import partial_suffix_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
# Leading whitespace a ``<think>`` may follow; more than this and the text is plain content, so
# a stream never holds more than this back while it waits to see whether thinking starts.
MAX_THINK_INDENT = 64

_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.DOTALL)


def prompt_thinking(tokenizer: Any, prompt_ids: list[int]) -> tuple[bool, bool]:
    """``(thinking, starts_in_reasoning)`` for a rendered chat prompt.

    Qwen3's template closes an empty ``<think></think>`` when thinking is disabled, and
    some templates (Qwen3.5's) open ``<think>`` so the reply starts inside the thinking block.
    """
    tail = _prompt_tail(tokenizer, prompt_ids)
    return not tail.endswith(THINK_CLOSE), tail.endswith(THINK_OPEN)


def prompt_opens_thinking(tokenizer: Any, prompt: str | Sequence[int]) -> bool:
    """True when a rendered prompt (text or token ids) ends inside an open ``<think>``: the
    reply starts as reasoning and has no ``<think>`` of its own, only the ``</think>``."""
    return _prompt_tail(tokenizer, prompt).endswith(THINK_OPEN)


def _prompt_tail(tokenizer: Any, prompt: str | Sequence[int]) -> str:
    tail = prompt[-len(THINK_OPEN) - 8:] if isinstance(prompt, str) \
        else tokenizer.decode(list(prompt[-4:]))
    return tail.rstrip()


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """Split generated text into ``(reasoning, content)``.

    ``reasoning`` is None when the text has no thinking block. The newlines that Qwen3 puts
    around the thinking and after ``</think>`` are dropped. ``starts_in_reasoning`` says the
    prompt already opened ``<think>``; a ``</think>`` without an opening tag implies the same.
    An unclosed block (generation cut off while thinking) is all reasoning, and a ``<think>``
    after more than :data:`MAX_THINK_INDENT` characters of whitespace is not an opening tag.
    """
    if starts_in_reasoning:
        body = text
    else:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN) and len(text) - len(stripped) <= MAX_THINK_INDENT:
            body = stripped[len(THINK_OPEN):]
        elif THINK_CLOSE in text:
            body = text
        else:
            return None, text
    reasoning, closed, content = body.partition(THINK_CLOSE)
    return reasoning.strip("\n"), content.lstrip("\n") if closed else ""


class ReasoningStreamParser:
    """Incremental :func:`split_reasoning`: tags may be split across deltas.

    The concatenated outputs of ``feed`` and ``flush`` equal ``split_reasoning`` of the whole
    text (given the same ``starts_in_reasoning``), except that an orphan ``</think>`` is only
    recognised when ``starts_in_reasoning`` is set (a stream cannot wait for it).
    ``enabled=False`` passes everything through as content (thinking disabled in the prompt).
    """

    def __init__(self, starts_in_reasoning: bool = False, enabled: bool = True) -> None:
        if not enabled:
            self._state = "content"
        else:
            self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""
        # True at the start of a section whose leading newlines Qwen3 adds and we drop.
        self._lead = self._state == "reasoning"
        self.saw_reasoning = self._state == "reasoning"

    def feed(self, delta: str) -> tuple[str, str]:
        """Add generated text; returns ``(reasoning_delta, content_delta)``."""
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> tuple[str, str]:
        """End of generation: release whatever was held back for a possible tag."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content, final):
            pass
        return "".join(reasoning), "".join(content)

    def _step(self, reasoning: list[str], content: list[str], final: bool) -> bool:
        """Process the buffer in the current state; True when the state changed."""
        if self._state == "start":
            return self._step_start(content, final)
        if self._state == "reasoning":
            return self._step_reasoning(reasoning, final)
        self._step_content(content)
        return False

    def _step_start(self, content: list[str], final: bool) -> bool:
        stripped = self._buf.lstrip()
        if len(self._buf) - len(stripped) <= MAX_THINK_INDENT:
            if stripped.startswith(THINK_OPEN):
                self._buf = stripped[len(THINK_OPEN):]
                self._state, self._lead, self.saw_reasoning = "reasoning", True, True
                return True
            if THINK_OPEN.startswith(stripped) and not final:
                return False  # could still become "<think>"
        self._state, self._lead = "content", False
        return True

    def _step_reasoning(self, reasoning: list[str], final: bool) -> bool:
        if self._lead:
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return False
            self._lead = False
        head, closed, tail = self._buf.partition(THINK_CLOSE)
        if closed:
            reasoning.append(head.rstrip("\n"))
            self._buf, self._state, self._lead = tail, "content", True
            return True
        if final:
            reasoning.append(self._buf.rstrip("\n"))
            self._buf = ""
            return False
        # Hold back a possible partial "</think>" and trailing newlines (dropped before the tag).
        keep = len(self._buf) - partial_suffix_len(self._buf, [THINK_CLOSE])
        emit = self._buf[:keep].rstrip("\n")
        reasoning.append(emit)
        self._buf = self._buf[len(emit):]
        return False

    def _step_content(self, content: list[str]) -> None:
        if self._lead:
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return
            self._lead = False
        content.append(self._buf)
        self._buf = ""


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_call_from_json(raw: str) -> dict[str, Any] | None:
    """One OpenAI tool call from the JSON inside a ``<tool_call>`` block, or None if malformed."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {
        "id": new_tool_call_id(),
        "type": "function",
        "function": {"name": data["name"], "arguments": args},
    }


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Extract Qwen3 ``<tool_call>{json}</tool_call>`` blocks.

    Returns ``(content, tool_calls)``: the text with the parsed blocks removed (stripped) and
    the calls in OpenAI shape. A block whose JSON is malformed stays in the content.
    """
    def parse(match: re.Match) -> list[dict[str, Any]]:
        call = _tool_call_from_json(match.group(1).strip())
        return [] if call is None else [call]

    return extract_calls(text, _TOOL_BLOCK, parse)


def extract_calls(text: str, pattern: re.Pattern, parse: Callable[[re.Match], list[dict[str, Any]]]
                  ) -> tuple[str, list[dict[str, Any]]]:
    """``(content, calls)``: the blocks of ``text`` matching ``pattern`` that ``parse`` turns
    into calls are cut out of the content (stripped); a block it gives nothing for stays."""
    calls: list[dict[str, Any]] = []
    parts: list[str] = []
    pos = 0
    for match in pattern.finditer(text):
        found = parse(match)
        if not found:
            continue
        calls += found
        parts.append(text[pos:match.start()])
        pos = match.end()
    if not calls:
        return text, []
    parts.append(text[pos:])
    return "".join(parts).strip(), calls


class ToolCallStreamParser:
    """Streams content until a tool call starts, then buffers the rest for parsing.

    Tool calls are only known once they are complete, so everything from the first opener
    (``<tool_call>``; the XML format also a bare ``<function=``) on is held and parsed by
    :meth:`flush` at the end of generation, with ``parse`` (Qwen3's JSON calls by default).
    """

    def __init__(self, parse: Callable[[str], tuple[str, list[dict[str, Any]]]] = parse_tool_calls,
                 openers: Sequence[str] = (TOOL_OPEN,)) -> None:
        self._buf = ""
        self._in_tools = False
        self._parse, self._openers = parse, list(openers)

    def feed(self, delta: str) -> str:
        """Add content; returns the content that is safe to send now."""
        self._buf += delta
        if self._in_tools:
            return ""
        starts = [i for i in (self._buf.find(o) for o in self._openers) if i >= 0]
        if starts:
            self._in_tools = True
            head, self._buf = self._buf[:min(starts)], self._buf[min(starts):]
            return head
        keep = len(self._buf) - partial_suffix_len(self._buf, self._openers)
        out, self._buf = self._buf[:keep], self._buf[keep:]
        return out

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """Returns ``(remaining_content, tool_calls)`` for the held text."""
        held, self._buf = self._buf, ""
        if not self._in_tools:
            return held, []
        return self._parse(held)

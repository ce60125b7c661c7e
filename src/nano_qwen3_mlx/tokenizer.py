"""Tokenizer: `tokenizers` backend, jinja2 chat template, streaming detokenizer, stop matcher."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import first_line
from .tokenizer_cache import shared_backend

# transformers' fallback template for models that ship none (ChatML).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet, reversed: each byte is written as one printable character
    (printable Latin-1 bytes as themselves, the others as chr(256 + n) in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


BYTE_DECODER = _byte_decoder()


class Tokenizer:
    """A Hugging Face `tokenizers` tokenizer plus the model's chat template and EOS ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        specials = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._special_tokens = {k: v for k, v in specials.items() if v is not None}
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.pad_token_id: int | None = backend.token_to_id(pad_token) if pad_token else None
        self.add_bos_token = add_bos_token
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids: list[int] = _unique([eos_id, *(eos_token_ids or [])], drop=None)
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)
        # How the model writes tool calls: "xml" (Qwen3.5, Qwen3-Coder) or "json" (Qwen3).
        self.tool_call_format = template_tool_call_format(chat_template)
        self._byte_level = isinstance(backend.decoder, tokenizers.decoders.ByteLevel)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding `tokenizer.json` (+ `tokenizer_config.json`, `config.json`,
        `generation_config.json`, `chat_template.jinja` when present). Raises a one-line ValueError
        naming the file that is missing or corrupt."""
        path = Path(path)
        backend = _load_backend(path / "tokenizer.json")
        config = _read_json(path / "tokenizer_config.json") or {}
        eos_ids = [
            *_id_list(_read_json(path / "config.json")),
            *_id_list(_read_json(path / "generation_config.json")),
        ]
        return cls(
            backend,
            chat_template=_find_chat_template(path, config),
            eos_token_ids=eos_ids,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended only when the config asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """Display text of one token (for logprobs): ' hello' rather than 'Ġhello'."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` like transformers' `apply_chat_template` (extra kwargs such as
        `enable_thinking=False` reach the template). Content given as OpenAI content parts is
        joined into one string. Template errors are raised as ValueError."""
        chat = [_normalize_message(m) for m in messages]
        if self.tool_call_format == "xml":  # its template walks arguments with |items
            chat = [_arguments_as_mappings(m) for m in chat]
        context = {**self._special_tokens, **kwargs}  # kwargs win, as in transformers
        try:
            text = self._template.render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: with byte-level BPE (Qwen3, GPT-2, Llama 3) or
        byte-fallback tokens (``<0xE2>``) that may be part of a character."""
        token = self.backend.id_to_token(token_id) or ""
        if self._byte_level and all(c in BYTE_DECODER for c in token):
            return bytes(BYTE_DECODER[c] for c in token)
        if match := _BYTE_TOKEN.fullmatch(token):
            return bytes([int(match[1], 16)])
        return self.decode([token_id]).encode("utf-8")

    def ends_mid_character(self, ids: Sequence[int]) -> bool:
        """Whether the bytes of ``ids`` end in an incomplete UTF-8 sequence (a character cut
        before its last byte), which decodes to one U+FFFD."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # A character has at most 4 bytes, so the last 4 tokens hold any cut one.
        decoder.decode(b"".join(self.token_bytes(i) for i in ids[-4:]), final=False)
        return bool(decoder.getstate()[0])

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces (vLLM's prefix/read offsets).

    Only the tokens since the last emitted piece are decoded, together with the tokens of that piece
    as context, so each step costs O(window), not O(sequence). Text is held back while it ends in
    U+FFFD: the next token may complete the multi-byte character. At the end (``finalize``) a
    character the stream cut in half is dropped rather than written as U+FFFD; a U+FFFD the
    model wrote whole is kept.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # only the window: tokens from the prefix offset on
        self._read = 0  # window index where not-yet-emitted tokens start
        self._prefix_len = 0  # len(decode(self._ids[:self._read]))

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Append token(s); return the newly completed text (may be '')."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        text = self._decode(self._ids)
        if len(text) < self._prefix_len or text.endswith("\ufffd"):
            return ""
        # Emit even an empty piece: sliding the window keeps runs of skipped tokens O(1).
        return self._emit(text)

    def finalize(self) -> str:
        """Flush the held-back tail, less a character cut before its last byte."""
        text = self._decode(self._ids)
        if text.endswith("\ufffd") and self._tokenizer.ends_mid_character(self._ids):
            text = text[:-1]
        return self._emit(text) if len(text) > self._prefix_len else ""

    def _emit(self, text: str) -> str:
        piece = text[self._prefix_len :]
        # Slide the window: the tokens just emitted become the context of the next decode.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_len = len(self._decode(self._ids))
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


class StopMatcher:
    """Finds stop strings in streamed text, across piece boundaries.

    A stop matches at the first position where one completes (ties: the longest), so the
    result does not depend on how the text was split into pieces.
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        self.stop_sequences = _unique(stop_sequences)  # "" would match everywhere
        self.matched: str | None = None
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Take the next piece; return (text safe to emit now, matched stop string or None)."""
        if self.matched is not None:
            return "", self.matched
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            self.matched, self._held = hit[1], ""
            return buf[: hit[0]], self.matched
        keep = partial_suffix_len(buf, self.stop_sequences)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """End of generation without a match: return the held-back tail."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -len, stop): earliest end, then longest
        for stop in self.stop_sequences:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                best = key if best is None or key < best else best
        return None if best is None else (best[0] + best[1], best[2])



def template_tool_call_format(template: str | None) -> str:
    """``"xml"`` when a chat template writes tool calls as ``<function=NAME>`` with
    ``<parameter=P>`` blocks (Qwen3.5, Qwen3-Coder), else ``"json"`` (Qwen3's
    ``{"name": ..., "arguments": ...}``, also what a template without tools is given)."""
    xml = template is not None and "<function=" in template and "<parameter=" in template
    return "xml" if xml else "json"


def partial_suffix_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``tags``:
    what a stream must hold back because the next piece may complete a tag."""
    longest = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:k]):
                longest = k
                break
    return longest


def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from e


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes '<' '>' '&' and sorts keys; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _normalize_message(message: Any) -> dict:
    """Plain dict, None fields dropped (as transformers does), content parts joined, reasoning aliased."""
    if callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    msg = {k: v for k, v in dict(message).items() if v is not None}
    content = msg.get("content", "")  # OpenAI sends content=null on tool-call turns
    msg["content"] = content if isinstance(content, str) else _join_text_parts(content)
    reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def _arguments_as_mappings(message: dict) -> dict:
    """OpenAI sends a call's ``arguments`` as a JSON string; an XML-format template iterates
    them as a mapping (``arguments|items``). Strings that are no JSON object stay as sent."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    return {**message, "tool_calls": [_call_with_mapping(c) for c in calls]}


def _call_with_mapping(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    args = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(args, str):
        return call
    try:
        parsed = json.loads(args or "{}")
    except (json.JSONDecodeError, RecursionError):
        return call
    if not isinstance(parsed, dict):
        return call
    return {**call, "function": {**function, "arguments": parsed}}


def _join_text_parts(parts: Sequence[Any]) -> str:
    # The model is text-only: refuse images etc. rather than silently dropping them.
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"unsupported message content part: {kind!r} (only 'text')")
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)  # vLLM's choice for string-content templates


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ValueError(f"tokenizer file not found: {path}")
    try:
        return shared_backend(path)  # parsed once per process and content
    except Exception as e:  # tokenizers raises a bare Exception on bad input
        raise ValueError(f"cannot load tokenizer file {path}: {first_line(e)}") from e


def _read_json(path: Path) -> dict | None:
    """Parsed JSON object, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object")
    return data


def _find_chat_template(path: Path, config: dict) -> str | None:
    # transformers' precedence: chat_template.jinja > chat_template.json > tokenizer_config.json.
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = (_read_json(path / "chat_template.json") or config).get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name", "template"}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _id_list(config: dict | None) -> list[int]:
    value = (config or {}).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int)]


def _token_content(token: Any) -> str | None:
    # Special tokens are stored either as strings or as serialized AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _unique(items: Sequence[Any], drop: Any = "") -> list:
    """Items in first-seen order, without duplicates or `drop`."""
    return [x for x in dict.fromkeys(items) if x != drop]

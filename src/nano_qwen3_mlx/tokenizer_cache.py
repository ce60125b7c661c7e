"""Tokenizers shared by the engines of one process.

Parsing Qwen3's ``tokenizer.json`` (152K tokens) takes about a second, and llguidance's view
of the same vocabulary about as long again. Every engine on the same files (several models
in one server, a reload, a draft model, the test suite's many engines) paid both. Both are
kept for the last few tokenizers, keyed by the file's content (a changed file is read again);
neither is changed after it is built, so sharing one between engines and threads is safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import tokenizers

# A few: the memory of one 152K-token tokenizer (tens of MB) stays held after its engines go.
_SIZE = 2
_lock = threading.Lock()
_backends: OrderedDict[bytes, tokenizers.Tokenizer] = OrderedDict()
_lltokenizers: OrderedDict[tuple, tuple[tokenizers.Tokenizer, Any]] = OrderedDict()


def shared_backend(path: Path) -> tokenizers.Tokenizer:
    """``tokenizers.Tokenizer.from_file(path)``, parsed once per content. Raises what
    ``from_file`` raises for a bad file (nothing is kept then)."""
    data = path.read_bytes()
    key = hashlib.blake2b(data, digest_size=16).digest()
    with _lock:  # held while parsing: two engines loading at once parse it once
        if (backend := _backends.get(key)) is None:
            backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        _remember(_backends, key, backend)
        return backend


def shared_lltokenizer(backend: tokenizers.Tokenizer, n_vocab: int, eos_ids: list[int]) -> Any:
    """llguidance's ``LLTokenizer`` for ``backend`` (one per backend, vocabulary size and EOS
    ids)."""
    import llguidance as llg

    key = (id(backend), n_vocab, tuple(eos_ids))
    with _lock:
        if (hit := _lltokenizers.get(key)) is None:
            # The backend is kept with it: its id cannot name another tokenizer meanwhile.
            hit = backend, llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=list(eos_ids))
        _remember(_lltokenizers, key, hit)
        return hit[1]


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _SIZE:
        cache.popitem(last=False)

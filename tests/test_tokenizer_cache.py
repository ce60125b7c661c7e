"""Tokenizers shared by a process's engines (tokenizer_cache.py): one parse per content, a
changed or broken file read again, llguidance's tokenizer one per backend and vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nano_qwen3_mlx.engine.grammar import GrammarCompiler
from nano_qwen3_mlx.tokenizer import Tokenizer


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_one_parse_per_content_and_a_changed_file_is_read_again(tmp_path, qwen_tokenizer_dir):
    a = copy(qwen_tokenizer_dir, tmp_path / "a")
    b = copy(qwen_tokenizer_dir, tmp_path / "b")
    first, same = Tokenizer.from_pretrained(a), Tokenizer.from_pretrained(b)
    assert first.backend is same.backend  # another folder, the same bytes
    assert first.encode("Hello world") == same.encode("Hello world")
    # A special token renamed in the file: another tokenizer, which knows the new name.
    text = (b / "tokenizer.json").read_text(encoding="utf-8")
    (b / "tokenizer.json").write_text(text.replace('"<|endoftext|>"', '"<|endoftext2|>"'),
                                      encoding="utf-8")
    changed = Tokenizer.from_pretrained(b)
    assert changed.backend is not first.backend
    assert len(changed.encode("<|endoftext2|>")) == 1 < len(first.encode("<|endoftext2|>"))
    assert Tokenizer.from_pretrained(a).backend is first.backend


def test_a_broken_file_is_an_error_every_time(tmp_path, qwen_tokenizer_dir):
    bad = copy(qwen_tokenizer_dir, tmp_path / "bad")
    (bad / "tokenizer.json").write_text('{"model": 1', encoding="utf-8")
    for _ in range(2):  # not remembered: the second load fails the same way
        with pytest.raises(ValueError, match="cannot load tokenizer file"):
            Tokenizer.from_pretrained(bad)


def test_llguidance_tokenizer_is_shared_per_backend_and_vocabulary(qwen_tokenizer_dir):
    tok = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    one, two = GrammarCompiler(tok, 151936), GrammarCompiler(tok, 151936)
    assert one.lltokenizer is two.lltokenizer
    other = GrammarCompiler(tok, 152064)  # a model whose vocabulary is padded further
    assert other.lltokenizer is not one.lltokenizer
    assert other.lltokenizer.vocab_size == 152064 and one.lltokenizer.vocab_size == 151936

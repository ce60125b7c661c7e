"""Where model files live: ``$NANO_QWEN3_WEIGHTS``, ``./weights`` (a repo checkout), then
the user cache directory (``platformdirs``). Nothing here depends on where the package is."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "nano-qwen3-mlx"


def user_weights_dir() -> Path:
    """The per-user cache folder for fetched model files (created on first use)."""
    return Path(platformdirs.user_cache_dir(APP_NAME)) / "weights"


def user_prefix_cache_dir() -> Path:
    """The per-user folder of the prefix cache's disk tier when only its size is given."""
    return Path(platformdirs.user_cache_dir(APP_NAME)) / "prefix-cache"


def weights_dirs() -> list[Path]:
    """Folders searched for model files, first match wins."""
    dirs = []
    if env := os.environ.get("NANO_QWEN3_WEIGHTS"):
        dirs.append(Path(env).expanduser())
    local = Path.cwd() / "weights"
    if local.is_dir():
        dirs.append(local)
    dirs.append(user_weights_dir())
    return dirs


def find_weights(name: str) -> Path | None:
    """``name`` in the first folder of :func:`weights_dirs` that has it."""
    for folder in weights_dirs():
        if (folder / name).exists():
            return folder / name
    return None


def download_dir() -> Path:
    """Where ``nano-qwen3 download`` puts files: the first folder that is set or exists."""
    return weights_dirs()[0]

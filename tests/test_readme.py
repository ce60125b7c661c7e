"""The README's commands exist: every `nano-qwen3 <command>` and `just <recipe>` it names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
JUSTFILE = (Path(__file__).resolve().parents[1] / "justfile").read_text()


def test_cli_commands_in_readme_exist():
    named = set(re.findall(r"nano-qwen3 ([a-z]+)", README))
    assert {"generate", "serve", "chat", "bench", "models", "download"} <= named
    for command in sorted(named):
        result = subprocess.run([sys.executable, "-m", "nano_qwen3_mlx.cli", command, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)


def test_just_recipes_in_readme_exist():
    recipes = set(re.findall(r"^([a-z]+)\b[^:\n]*:", JUSTFILE, re.M))
    named = set(re.findall(r"just ([a-z]+)", README))
    assert {"demo", "test"} <= named
    assert named <= recipes, named - recipes


def test_scripts_in_readme_exist():
    root = Path(__file__).resolve().parents[1]
    for script in re.findall(r"python (scripts/[a-z_]+\.py)", README):
        assert (root / script).is_file(), script

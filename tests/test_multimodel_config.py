"""``serve`` with several models: ``--model`` repeated (``NAME=MODEL``), ``[[models]]`` in the
config file, ``--model-ttl``, and the one-line errors for bad entries."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from nano_qwen3_mlx.cli import app as cli_app
from nano_qwen3_mlx.server import launch


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run(engine_config, server_config, specs=None):
        seen.update(engine=engine_config, server=server_config, specs=specs)
        return asyncio.sleep(0, result=0)

    monkeypatch.setattr(launch, "run_server", fake_run)
    return seen


def serve(*args: str):
    return CliRunner().invoke(cli_app, ["serve", *args])


def test_repeated_model_flags_make_a_pool(captured, tiny_qwen3_dir, smollm2_gguf):
    result = serve("--model", str(tiny_qwen3_dir), "--model", f"smol={smollm2_gguf}",
                   "--model-ttl", "60", "--max-memory-gb", "3")
    assert result.exit_code == 0, result.output
    specs = captured["specs"]
    assert [s.id for s in specs] == [str(tiny_qwen3_dir), "smol"]
    assert specs[1].config.model == str(smollm2_gguf) and specs[1].ttl_s == 60
    assert specs[1].config.max_memory_gb == 3  # the budget, and each engine's own cap


def test_one_model_keeps_the_single_engine_path(captured, tiny_qwen3_dir):
    assert serve("--model", str(tiny_qwen3_dir)).exit_code == 0
    assert captured["specs"] is None and captured["engine"].model == str(tiny_qwen3_dir)


def test_models_list_in_the_config_file(captured, tmp_path, tiny_qwen3_dir, smollm2_gguf):
    path = tmp_path / "models.toml"
    path.write_text(f'''model_ttl = 30
[[models]]
model = "{tiny_qwen3_dir}"
alias = "tiny"
max_model_len = 128
pinned = true

[[models]]
model = "{smollm2_gguf}"
alias = "smol"
quantize = 8
ttl = 5
''')
    result = serve("--config", str(path))
    assert result.exit_code == 0, result.output
    tiny, smol = captured["specs"]
    assert (tiny.id, tiny.pinned, tiny.ttl_s, tiny.config.max_model_len) == ("tiny", True, 30, 128)
    assert (smol.id, smol.ttl_s, smol.config.quantize) == ("smol", 5, 8)


@pytest.mark.parametrize(("entry", "message"), [
    ('alias = "x"', "`model` is required"),
    ('model = "qwen3-0.6b"\nquantise = 4', "unknown key 'quantise' (did you mean 'quantize'?)"),
    ('model = "qwen3-0.6b"\nquantize = 3', "invalid quantize"),
])
def test_bad_entries_are_one_error_line(captured, tmp_path, entry, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[[models]]\n{entry}\n")
    result = serve("--config", str(path))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "specs" not in captured


def test_a_repeated_id_and_a_served_name_are_refused(captured, tiny_qwen3_dir):
    result = serve("--model", str(tiny_qwen3_dir), "--model", str(tiny_qwen3_dir))
    assert result.exit_code == 2 and "given twice" in result.output
    result = serve("--model", f"a={tiny_qwen3_dir}", "--model", f"b={tiny_qwen3_dir}",
                   "--served-model-name", "x")
    assert result.exit_code == 2 and "--served-model-name" in result.output

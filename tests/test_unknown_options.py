"""Unknown options are errors naming the option: ``LLM(...)`` / ``AsyncLLM(...)`` keyword
arguments and config-file keys that are no engine or server setting. Environment variables
that are not ours stay ignored."""

from __future__ import annotations

import pytest

from nano_qwen3_mlx import LLM, AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.errors import InvalidRequestError
from tests.test_cli import run_cli


@pytest.mark.parametrize("face", [LLM, AsyncLLM])
def test_misspelt_engine_option_raises_naming_it(face):
    with pytest.raises(InvalidRequestError, match="unknown engine option 'speculativ'") as info:
        face("m", speculativ="x")
    assert info.value.field == "speculativ"
    with pytest.raises(InvalidRequestError, match=r"'max_num_seq'.*did you mean 'max_num_seqs'"):
        face("m", max_num_seq=4)


def test_config_with_options_is_an_error_not_a_silent_drop():
    with pytest.raises(InvalidRequestError, match="not both") as info:
        LLM(config=EngineConfig(model="m"), block_size=32)
    assert info.value.field == "block_size"


@pytest.mark.parametrize("text, name", [
    ("[engine]\nmax_num_seq = 4\n", "max_num_seq"),
    ("[server]\nprot = 80\n", "prot"),
    ("[engine]\nport = 80\n", "port"),  # a server setting in the engine section
    ("kv_cahce_gb = 1\n", "kv_cahce_gb"),
    ("[enigne]\nmodel = 'x'\n", "enigne"),
])
def test_unknown_config_file_keys_raise_naming_them(tmp_path, text, name):
    path = tmp_path / "c.toml"
    path.write_text(text)
    for cls in (EngineConfig, ServerConfig):
        with pytest.raises(InvalidRequestError, match=repr(name)) as info:
            cls.load(path)
        assert info.value.field == name and str(path) in str(info.value)


def test_known_keys_at_top_level_belong_to_either_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("port = 9000\nmax_num_seqs = 3\n[server]\n"
                    "reasoning_effort_budgets = { low = 7 }\n")
    assert EngineConfig.load(path).max_num_seqs == 3
    server = ServerConfig.load(path)
    assert server.port == 9000 and server.reasoning_effort_budgets["low"] == 7
    assert server.reasoning_effort_budgets["high"] == 8192  # the others keep their defaults


def test_foreign_environment_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("SPECULATIV", "x")
    monkeypatch.setenv("NANO_QWEN3_NOT_A_SETTING", "1")
    assert EngineConfig.load(model="m").model == "m"


def test_cli_config_file_typo_is_one_error_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nmax_num_seq = 4\n")
    result = run_cli("generate", "hi", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config file {path}: unknown key in [engine] 'max_num_seq' "
        "(did you mean 'max_num_seqs'?)"]

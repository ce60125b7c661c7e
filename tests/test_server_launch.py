"""``nano-qwen3 serve`` option handling that needs no model: refusals exit 2 in one line."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from nano_qwen3_mlx.cli import app
from nano_qwen3_mlx.server.launch import _is_loopback


def test_workers_refused():
    result = CliRunner().invoke(app, ["serve", "--workers", "4"])
    assert result.exit_code == 2
    assert "replicas" in result.output and "Traceback" not in result.output


def test_bad_port_refused():
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "port" in result.output


def test_busy_port_fails_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # An existing directory passes the up-front model check; it would fail only to load.
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen" in result.output


def test_loopback_detection():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.2")


def test_itl_ratio_that_cannot_be_met_refused():
    result = CliRunner().invoke(app, ["serve", "--max-itl-ratio", "0.5"])
    assert result.exit_code == 2 and "max_itl_ratio" in result.output
    assert result.output.strip().count("\n") == 0


def test_unknown_speculative_method_refused():
    result = CliRunner().invoke(app, ["serve", "--speculative", "medusa"])
    assert result.exit_code == 2 and "speculative" in result.output
    assert result.output.strip().count("\n") == 0


def test_pool_sizes_in_mib_in_log_and_banner(tiny_qwen3_dir, caplog, capsys):
    """The engine's log and the serve banner write the same KV pool in the same unit."""
    from types import SimpleNamespace

    from nano_qwen3_mlx import LLM
    from nano_qwen3_mlx.engine.stats import mib
    from nano_qwen3_mlx.server.launch import _banner

    with caplog.at_level("INFO", logger="nano_qwen3_mlx"), \
            LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        pool = mib(llm.engine.cache.nbytes)
        _banner(SimpleNamespace(engine=llm.engine, model_name="tiny"), "http://127.0.0.1:1")
    logged = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV pool:"))
    banner = capsys.readouterr().err
    assert pool.endswith(" MiB") and f"({pool})" in logged and f"KV pool {pool} " in banner
    assert " MB" not in logged + banner

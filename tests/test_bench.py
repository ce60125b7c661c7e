"""`nano-qwen3 bench` on a tiny checkpoint with tiny lengths: the report's structure, every
ratio computed from both engines' own measurements. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from nano_qwen3_mlx.bench import chat
from nano_qwen3_mlx.bench.report import BenchPlan, markdown, run


def assert_ratios(row: dict) -> None:
    for key, value in row["ratios"].items():
        ours, peer = row["ours"][key], row["mlx_lm"][key]
        assert ours > 0 and peer > 0, key
        assert value == pytest.approx(ours / peer), key


def test_lengths_and_mixed(tiny_qwen3_dir, tmp_path):
    plan = BenchPlan(model=str(tiny_qwen3_dir), suites=["lengths", "mixed"], prompt_lens=[20],
                     batches=[1, 3], gen_len=4,
                     mixed={"running": 2, "short_len": 8, "long_len": 24, "num_long": 1, "gen_len": 8},
                     engine_options={"max_itl_ratio": 2.0})
    report = run(plan, tmp_path / "r.json", progress=lambda _: None)
    assert json.loads((tmp_path / "r.json").read_text())["lengths"] == report["lengths"]
    assert [(r["prompt_len"], r["batch"]) for r in report["lengths"]] == [(20, 1), (20, 3)]
    for row in report["lengths"]:
        for engine in ("ours", "mlx_lm"):
            assert row[engine]["tokens"] == row["batch"] * 4  # every stream got every token
            assert row[engine]["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # layers, K+V, heads, dim, fp32
        assert_ratios(row)
    mixed = report["mixed"]
    for engine in ("ours", "mlx_lm"):
        assert mixed[engine]["itl_p50_s"] <= mixed[engine]["itl_p99_s"] <= mixed[engine]["itl_max_s"]
    assert_ratios(mixed)
    text = markdown(report)
    assert "| 20 | 3 |" in text and "inter-token p99 s" in text
    assert "max_itl_ratio=2.0" in text  # our engine's options are stated beside the numbers


def test_chat_against_both_servers(tiny_qwen3_dir):
    plan = chat.ChatPlan(turns=2, turn_words=12, answer_tokens=3, clients=2, system_words=48,
                         client_words=4, client_tokens=2)
    section = chat.run(tiny_qwen3_dir, plan, progress=lambda _: None)
    ours, peer = section["ours"], section["mlx_lm"]
    for server in (ours, peer):
        assert len(server["turns"]) == 2 and [r["round"] for r in server["shared_system"]] == ["cold", "warm"]
        assert all(t["computed_tokens"] is not None for t in server["turns"])
    first, second = ours["turns"]
    new = second["prompt_tokens"] - ours["template_reuse"][1]
    # Only the warm-up request's opening tokens ("<|im_start|>user\n") can be reused by turn 1;
    # turn 2 reuses exactly what the template leaves of turn 1 (token-granular, copy-on-write).
    assert first["prompt_tokens"] - 16 < first["computed_tokens"] <= first["prompt_tokens"]
    assert second["computed_tokens"] == new
    cold, warm = ours["shared_system"]
    assert cold["prefill_computed"] < cold["prompt_tokens"]  # the second client shared the system prompt
    assert warm["prefill_computed"] < warm["prompt_tokens"] - 48
    ratios = section["ratios"]
    assert ratios["turn_ttft"] == [pytest.approx(a["ttft_s"] / b["ttft_s"]) for a, b in zip(ours["turns"], peer["turns"])]
    assert not any(math.isnan(v) for v in ratios["shared_system_ttft_mean"].values())
    assert "| 2 |" in "\n".join(markdown_lines(section))


def markdown_lines(section: dict) -> list[str]:
    from nano_qwen3_mlx.bench.report import chat_tables

    return chat_tables(section)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nano_qwen3_mlx.cli", "bench", *args],
                          capture_output=True, text=True, timeout=300)


def test_speculative_suite_runs_this_engine_with_and_without(tiny_qwen3_dir, tmp_path):
    plan = BenchPlan(model=str(tiny_qwen3_dir), suites=["speculative"], batches=[2], gen_len=6,
                     speculative={"speculative": "ngram", "num_speculative_tokens": 3})
    report = run(plan, tmp_path / "r.json", progress=lambda _: None)
    rows = report["speculative"]
    assert [(r["workload"], r["batch"]) for r in rows] == [("repeats", 2), ("rejected", 2)]
    for row in rows:
        assert row["plain"]["tokens"] == row["speculative"]["tokens"] == 2 * 6
        assert row["plain"]["stats"] is None and row["speculative"]["stats"]["method"] == "ngram"
        assert row["ratio"] == pytest.approx(row["speculative"]["decode_tok_s"] / row["plain"]["decode_tok_s"])
    text = markdown(report)
    assert "| repeats | 2 |" in text and "num_speculative_tokens': 3" in text


def test_cli_bench_tiny_shape(tmp_path):
    out = tmp_path / "b.json"
    result = run_cli("--shape", "tiny", "--prompt-len", "8", "--batch", "2", "--gen-len", "3",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| 8 | 2 |" in result.stdout
    assert json.loads(out.read_text())["model"] == "random tiny (float32)"


@pytest.mark.parametrize("args, message", [
    (["--suite", "speed"], "--suite"),
    (["--prompt-len", "a,b"], "--prompt-len"),
    (["--shape", "huge"], "unknown shape"),
    (["--gen-len", "1"], "--gen-len"),
    (["--max-itl-ratio", "1"], "--max-itl-ratio"),
    (["--block-size", "0"], "block_size"),
    (["--speculative", "medusa"], "speculative"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
])
def test_cli_bench_bad_input_is_one_line(args, message):
    from typer.testing import CliRunner

    from nano_qwen3_mlx.cli import app

    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_kept_checkpoint_is_built_once_and_found_again(tmp_path):
    """The disk-tier and agent-replay scripts restart servers on the same weights: the
    checkpoint folder is built when missing and reused as it is when there."""
    from nano_qwen3_mlx.bench.shapes import kept_checkpoint

    folder = tmp_path / "ckpt"
    assert kept_checkpoint("tiny", "float32", folder) == folder
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "marker").write_text("kept")
    assert kept_checkpoint("tiny", "float32", folder) == folder
    assert (folder / "marker").exists() and (folder / "model.safetensors").read_bytes() == weights
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3"

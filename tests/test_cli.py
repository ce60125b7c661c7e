"""`nano-qwen3` as a user runs it: a subprocess, stdout text, a one-line error and exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_generate_streams_text_and_prints_summary(tiny_qwen3_dir):
    result = run_cli("generate", "Hello", "--model", str(tiny_qwen3_dir), "--max-tokens", "6",
                     "--temperature", "0", "--no-chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    summary = result.stderr.strip().splitlines()[-1]
    assert "6 tokens" in summary and "tok/s" in summary


def test_greedy_cli_equals_python_api(tiny_qwen3_dir):
    from nano_qwen3_mlx import LLM, SamplingParams

    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        messages = [{"role": "user", "content": "Hi there"}]
        ids = llm.tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
        expected = llm.generate_single(ids, SamplingParams(temperature=0, max_tokens=8))
    result = run_cli("generate", "Hi there", "--model", str(tiny_qwen3_dir), "-n", "8", "-t", "0",
                     "--no-stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected["generated_text"] + "\n"


def test_model_from_env_when_no_flag(tiny_qwen3_dir):
    result = run_cli("generate", "Hello", "-n", "2", "-t", "0", env={"MODEL_NAME": str(tiny_qwen3_dir)})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "/no/such/dir"], "no such model"),
    (["generate", "   ", "--model", "{tiny}"], "prompt is empty"),
    (["generate", "hi", "--model", "{tiny}", "--max-tokens", "-1"], "max_tokens"),
    (["generate", "hi", "--model", "{tiny}", "--temperature", "-2"], "temperature"),
    (["generate", "hi", "--model", "{broken}"], "config.json"),
    (["generate", "word " * 5000, "--model", "{tiny}", "-n", "2"], "context length is 4096"),
    (["generate", "hi", "--bogus"], "No such option: --bogus"),
    (["generate"], "Missing argument 'prompt'"),
    (["chat", "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["serve", "--model", "nosuchmodel", "--port", "0"], "unknown model 'nosuchmodel'"),
    (["serve", "--model", "./no/such/dir", "--port", "0"], "no such model file or directory"),
    (["download", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["bench", "--model", "nosuchmodel"], "--model must be a local checkpoint directory"),
    (["models", "extra"], "unexpected extra argument"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_qwen3_dir, tmp_path, args, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen3_dir, broken)
    (broken / "config.json").write_text("{oops")
    args = [a.format(tiny=tiny_qwen3_dir, broken=broken) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_aliases():
    result = run_cli("models")
    assert result.returncode == 0
    assert "qwen3-0.6b" in result.stdout and "smollm2-135m" in result.stdout
    assert "qwen3-30b-a3b-4bit" in result.stdout and "mlx-community/Qwen3-30B-A3B-4bit" in result.stdout


def test_corrupt_config_in_default_toml_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine\nmodel=")
    result = run_cli("generate", "hi", "--config", str(bad))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_chat_keeps_history_across_turns(tiny_qwen3_dir):
    from nano_qwen3_mlx import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=5)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        history, replies = [], []
        for turn in ("Hello", "What did I just say?"):
            history.append({"role": "user", "content": turn})
            ids = llm.tokenizer.apply_chat_template(history, tokenize=True, enable_thinking=False)
            replies.append(llm.generate_single(ids, params)["generated_text"])
            history.append({"role": "assistant", "content": replies[-1]})
    # Between the turns: a message over the 4096-token context, /help and an unknown command.
    # None reaches the model or the history; each is answered in one line on stderr.
    lines = ["Hello", "word " * 5000, "/help", "/foo", "What did I just say?", "/exit", "never"]
    result = subprocess.run(
        [sys.executable, "-m", "nano_qwen3_mlx.cli", "chat", "--model", str(tiny_qwen3_dir),
         "-n", "5", "-t", "0"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(r + "\n" for r in replies)
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 3 and "Traceback" not in result.stderr
    assert notes[0].startswith("error: prompt has") and "conversation so far is kept" in notes[0]
    assert notes[1].startswith("commands: ") and notes[2].startswith("unknown command /foo;")


def test_download_offline_is_one_line_error(tmp_path):
    result = run_cli("download", "qwen3-0.6b", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "not cached" in result.stderr


def test_config_errors_are_one_line_values():
    """Settings turn pydantic errors into one ValueError line naming the field."""
    from nano_qwen3_mlx.config import EngineConfig

    with pytest.raises(ValueError, match=r"^invalid max_num_seqs: .*greater than or equal to 1$"):
        EngineConfig.load(max_num_seqs=0)


@pytest.mark.parametrize("delay", [1.2, 1.6, 2.0])
def test_chat_ctrl_c_while_loading_exits_130_without_abort(smollm2_gguf, delay):
    """The engine thread loads the model; Ctrl-C then waits for it rather than leaving it
    inside MLX at exit (which aborts the process). On a slow machine each delay lands in
    another phase; without the wait most of them aborted here."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "nano_qwen3_mlx.cli", "chat", "--model",
                             str(smollm2_gguf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # while the model loads (or, on a fast machine, after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # Whenever it lands (importing, loading, or after: then stdin's EOF ends the chat), never
    # an abort.
    assert proc.returncode not in (-signal.SIGABRT, 134) and "terminate called" not in err, err

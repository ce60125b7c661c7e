"""Two local ranks on the CPU under ``mlx.launch --backend ring``, each loading its share of
the model: the same greedy output as one process (dense, MoE, hybrid, and split by layers
with ``--pipeline``), batching, prefix-cache hits, structured output and seeded sampling
with penalties, speculative decoding and embeddings through the ``LLM`` API (all in one
job: the launches cost most of the time); ``generate`` printing once (a draft model turned
off with a warning); ``serve`` answering the openai client and shutting down cleanly; a
killed rank ending the job with an error; ``bench`` on two ranks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.checkpoints import write_hybrid_checkpoint
from tests.distributed_worker import generate_report

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = ROOT / "tests" / "distributed_worker.py"


def _env() -> dict[str, str]:
    # The launched ranks import this checkout's source, as the test process does.
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _launch(*command: str) -> list[str]:
    launcher = BIN / "mlx.launch"
    assert launcher.exists(), "mlx.launch comes with mlx"
    return [str(launcher), "-n", "2", "--backend", "ring", "--python", sys.executable, *command]


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _report(proc: subprocess.CompletedProcess) -> list[dict]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[{")]
    assert len(lines) == 1, f"one JSON line expected (rank 0 only):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def parity(tiny_qwen3_dir, tiny_moe_dir, qwen_tokenizer_dir, tmp_path_factory) -> dict:
    """One job of two ranks runs every parity case, engine after engine (one launch: each
    costs seconds of start-up); this process runs the same requests on one rank."""
    hybrid = write_hybrid_checkpoint(tmp_path_factory.mktemp("hybrid"), qwen_tokenizer_dir)
    cases = {"dense": ("full", tiny_qwen3_dir), "moe": ("batch", tiny_moe_dir),
             "hybrid": ("states", hybrid), "pipeline": ("pipeline", tiny_qwen3_dir)}
    proc = _run(_launch(str(WORKER), *(f"{kind}={path}" for kind, path in cases.values())),
                timeout=240)
    two = dict(zip(cases, _report(proc), strict=True))
    one = {name: generate_report(str(path), kind) for name, (kind, path) in cases.items()
           if name != "pipeline"}  # one process ignores --pipeline: the dense run is its own
    one["pipeline"] = one["dense"]
    return {"one": one, "two": two}


def test_dense_parity_batch_prefix_cache_structured_seeded_speculative(parity):
    one, two = parity["one"]["dense"], parity["two"]["dense"]
    for key in ("batch", "again", "json", "sampled", "embedding", "drafted", "parameters"):
        assert two[key] == one[key], key  # parameters: the whole model's, counted before the split
    assert two["drafted"] > 0  # speculative steps (drafts in the plan) ran on both ranks
    assert len({tuple(t) for t in two["batch"]}) == 4  # four different prompts, batched
    assert two["again"][0] == two["again"][1]
    assert two["reused"] > 0 and two["reused"] == one["reused"]  # the prefix cache hit
    assert two["json"].startswith('{"name": "')
    assert one["distributed"] == {"world_size": 1, "rank": 0, "mode": "single"}
    dist = two["distributed"]
    assert (dist["world_size"], dist["rank"], dist["mode"]) == (2, 0, "tensor")
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert all(r["kv_bytes"] > 0 for r in dist["ranks"])
    # loaded split (load(prepare=shard_model)): each rank holds about half of the weights
    for r in dist["ranks"]:
        assert 0.49 <= r["weights_bytes"] / one["weights_bytes"] <= 0.52, r


@pytest.mark.parametrize("family", ["moe", "hybrid"])
def test_moe_and_hybrid_parity(family, parity):
    one, two = parity["one"][family], parity["two"][family]
    assert two["batch"] == one["batch"] and two["parameters"] == one["parameters"]
    if family == "hybrid":  # the state pool is per rank too, its slot copies in the plans
        for key in ("again", "sampled", "embedding"):
            assert two[key] == one[key], key
        assert two["snapshot_hits"]["restores"] == one["snapshot_hits"]["restores"] > 0
        assert all(r["state_bytes"] > 0 for r in two["distributed"]["ranks"])
    for r in two["distributed"]["ranks"]:
        assert r["weights_bytes"] / one["weights_bytes"] <= 0.52, r


def test_pipeline_parity_through_the_engine(parity):
    """--pipeline: each rank holds one of the two layers; greedy tokens as on one rank."""
    one, two = parity["one"]["pipeline"], parity["two"]["pipeline"]
    assert two["batch"] == one["batch"] and two["parameters"] == one["parameters"]
    dist = two["distributed"]
    assert (dist["world_size"], dist["mode"]) == (2, "pipeline")
    # each rank's weights: less than the whole (the embedding and output layer, most of
    # this tiny model, stay on every rank)
    assert all(0 < r["weights_bytes"] < one["weights_bytes"] for r in dist["ranks"])


def test_generate_cli_prints_once_pipelined_and_refuses_the_draft_model(smollm2_gguf):
    """``generate --pipeline`` of the demo GGUF (read whole, then split by layers: its 9
    attention heads do not split across 2 ranks) prints on two ranks what one process does;
    a draft model is turned off across ranks with a warning (it would run on rank 0 alone)."""
    # --max-tokens, not -n: mlx.launch would take -n as its own.
    args = ["generate", "Hello there", "--model", str(smollm2_gguf), "--max-tokens", "6",
            "--temperature", "0", "--no-chat"]
    one = _run([str(BIN / "nano-qwen3"), *args])
    two = _run(_launch(str(BIN / "nano-qwen3"), *args, "--pipeline", "--speculative", "draft",
                       "--draft-model", str(smollm2_gguf)))
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    assert two.stderr.count("6 tokens, finish=length") == 1, two.stderr
    assert two.stderr.count("speculative decoding with a draft model or MTP head is off "
                            "under mlx.launch") == 1, two.stderr


def test_the_mode_comes_from_the_config(tmp_path):
    """``pipeline = true`` under ``[engine]`` (or --pipeline) picks the split; one process
    stays "single" whatever it says."""
    from nano_qwen3_mlx.config import EngineConfig
    from nano_qwen3_mlx.distributed.world import World

    (tmp_path / "job.toml").write_text("[engine]\npipeline = true\n")
    assert EngineConfig.load(tmp_path / "job.toml").pipeline and not EngineConfig().pipeline
    assert World().with_mode(pipeline=True) == World()
    job = World(1, 2, "tensor")
    assert (job.with_mode(pipeline=True).mode, job.with_mode(pipeline=False).mode) == \
        ("pipeline", "tensor")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_pid(rank: int, marker: str) -> int:
    """The launched rank's process: MLX_RANK in its environment, ``marker`` in its command."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not entry.name.isdigit() or marker not in (entry / "cmdline").read_text():
                continue
            if f"MLX_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
    raise AssertionError(f"no process of rank {rank}")


@contextlib.contextmanager
def _serving(model: Path):
    port = _free_port()
    cmd = _launch(str(BIN / "nano-qwen3"), "serve", "--model", str(model), "--port", str(port),
                  "--served-model-name", "tiny", "--log-level", "warning", "--shutdown-grace", "2")
    proc = subprocess.Popen(cmd, env=_env() | {"NUM_KV_BLOCKS": "128", "MAX_MODEL_LEN": "512"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.3)
        yield proc, url, str(port)
    finally:
        if proc.poll() is None:
            proc.kill()


def _ended(proc: subprocess.Popen, within: float) -> str:
    """The launcher's output once it ended (within ``within`` seconds)."""
    try:
        out, _ = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the job did not end within {within} s: {proc.communicate()[0]}") from None
    return out


def test_serve_answers_openai_client_and_stops_cleanly(tiny_qwen3_dir):
    with _serving(tiny_qwen3_dir) as (proc, url, port):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                               temperature=0)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reply.choices[0].message.content
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as resp:
            stats = json.load(resp)
        dist = stats["distributed"]
        assert (dist["world_size"], dist["rank"], dist["mode"]) == (2, 0, "tensor")
        assert len(dist["ranks"]) == 2
        os.kill(_rank_pid(0, port), signal.SIGTERM)  # as a supervisor stops rank 0
        out = _ended(proc, 60)
    assert "exited with code" not in out and "error:" not in out, out
    assert out.count("listening") == 1, out  # one banner: only rank 0 serves


@pytest.mark.parametrize("killed", [1, 0])
def test_killed_rank_ends_the_job_with_an_error(killed, tiny_qwen3_dir):
    with _serving(tiny_qwen3_dir) as (proc, _, port):
        os.kill(_rank_pid(killed, port), signal.SIGKILL)
        out = _ended(proc, 60)
    survivor = 1 - killed
    assert f"Node with rank {survivor} exited with code 1" in out, out
    if killed:  # rank 0 (drained on the launcher's SIGTERM) found the follower gone
        assert "error: a rank of the distributed job is gone" in out, out
    else:
        assert "[rank 1] error: rank 1 stopped following rank 0" in out, out


def test_several_models_are_refused(tiny_qwen3_dir, tiny_moe_dir):
    proc = _run(_launch(str(BIN / "nano-qwen3"), "serve", "--model", f"a={tiny_qwen3_dir}",
                        "--model", f"b={tiny_moe_dir}", "--port", str(_free_port())), timeout=60)
    assert "error: serving several models is not supported under mlx.launch" in proc.stderr + \
        proc.stdout


def test_bench_times_this_engine_on_two_ranks_pipelined(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(_launch(str(BIN / "nano-qwen3"), "bench", "--shape", "tiny", "--prompt-len", "16",
                        "--gen-len", "4", "--batch", "1", "--pipeline", "--out", str(out)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("# nano-qwen3-mlx on 2 ranks (pipeline)") == 1, proc.stdout
    report = json.loads(out.read_text())
    assert [r["rank"] for r in report["distributed"]["ranks"]] == [0, 1]
    assert report["lengths"][0]["decode_tok_s"] > 0


class _RankOf:
    """A stand-in for rank ``rank`` of a 2-rank group: splitting communicates nothing."""

    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2


def test_a_model_the_ranks_cannot_split_is_a_load_error_naming_pipeline(tmp_path,
                                                                         qwen_tokenizer_dir):
    """9 query heads on 2 ranks (SmolLM2-135M's): a clear load error suggesting --pipeline;
    split by layers the same model loads, counted whole, each rank holding one layer."""
    from nano_qwen3_mlx.config import EngineConfig
    from nano_qwen3_mlx.distributed.attach import load_share
    from nano_qwen3_mlx.distributed.world import World
    from nano_qwen3_mlx.models.loader import ModelLoadError
    from tests.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path / "nine", qwen_tokenizer_dir, config_overrides={
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 16})
    config = EngineConfig(model=str(path), device="cpu")
    tensor = World(0, 2, "tensor", _RankOf(0))
    with pytest.raises(ModelLoadError, match=r"num_attention_heads=9 cannot be split across 2 "
                                             r"ranks \(tensor parallel\); --pipeline splits"):
        load_share(config, tensor)
    loaded, counts = load_share(config, tensor.with_mode(pipeline=True))
    assert len(loaded.model.layers) == 1 and counts == load_share(config, World())[1]

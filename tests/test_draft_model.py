"""Speculative decoding with a draft model (engine/draft_model.py): the same greedy tokens as
without it, the same sampled distribution at T > 0, no KV block leaks, a clear error for a
draft that does not share the target's vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.errors import InvalidRequestError
from nano_qwen3_mlx.models.loader import ModelLoadError
from tests.checkpoints import TINY_QWEN3, write_checkpoint
from tests.test_speculative import (
    BIAS,
    CHI2_CRIT,
    FEW,
    PROMPTS,
    _chi2_same,
    check_aborts_and_preemption,
    run,
)

SMALL = {**TINY_QWEN3, "vocab_size": 1024}
OPTS = dict(num_kv_blocks=128, block_size=4, max_num_seqs=8, device="cpu")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, qwen_tokenizer_dir):
    return write_checkpoint(tmp_path_factory.mktemp("draft-target"), qwen_tokenizer_dir, base=SMALL)


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory, qwen_tokenizer_dir):
    """Another random model (one layer, other weights): its drafts are mostly rejected."""
    return write_checkpoint(tmp_path_factory.mktemp("draft-other"), qwen_tokenizer_dir,
                            base={**SMALL, "num_hidden_layers": 1}, seed=1)


@pytest.fixture(scope="module")
def engines(target_dir, other_draft_dir):
    """Plain; drafted by the target's own weights (every draft accepted, greedy); drafted by
    another model (drafts rejected)."""
    with LLM(str(target_dir), **OPTS) as plain, \
            LLM(str(target_dir), speculative="draft", draft_model=str(target_dir), **OPTS) as same, \
            LLM(str(target_dir), speculative="draft", draft_model=str(other_draft_dir),
                num_speculative_tokens=3, **OPTS) as other:
        yield plain, same, other


# Several prompts, one of them twice (what n = 2 runs: one engine request per choice, the
# prompt's blocks shared).
BATCH = PROMPTS + [PROMPTS[0], [7, 8, 9, 10, 11, 12, 13]]


@pytest.mark.parametrize("extra", [
    {}, {"logprobs": 2}, {"max_tokens": 3}, {"stop": "from the text"}, {"logit_bias": BIAS},
])
def test_greedy_tokens_are_the_ones_without_speculation(engines, extra):
    plain, same, other = engines
    if extra.get("stop"):  # a stop string the greedy text reaches mid-way
        text = run(plain, BATCH[:1], [SamplingParams(temperature=0, max_tokens=24,
                                                     ignore_eos=True)])[0]["text"]
        extra = {"stop": [text[9:14]]}
    params = [SamplingParams(temperature=0, ignore_eos=True, **({"max_tokens": 24} | extra))] * len(BATCH)
    want = run(plain, BATCH, params)
    for spec in (same, other):
        stats = spec.engine.speculator.stats
        before = (stats.drafted, stats.accepted)
        got = run(spec, BATCH, params)
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
        assert [g["text"] for g in got] == [w["text"] for w in want]
        assert [g["finish"] for g in got] == [w["finish"] for w in want]
        if params[0].logprobs is not None:
            for g, w in zip(got, want):
                assert [r["token_id"] for r in g["logprobs"]] == g["tokens"]
                assert [r["logprob"] for r in g["logprobs"]] == pytest.approx(
                    [r["logprob"] for r in w["logprobs"]], abs=1e-4)
                assert all(len(r["top_logprobs"]) == 2 for r in g["logprobs"])
        drafted, accepted = stats.drafted - before[0], stats.accepted - before[1]
        if spec is same and "logit_bias" not in extra:  # its own weights: every draft holds
            assert drafted > 0  # (a stop string cuts runs short; the draft sees no logit_bias)
            assert accepted == drafted or ("stop" in extra and accepted > 0)
        elif spec is other:  # another model's drafts: rejected (a chance agreement aside), then seldom tried
            assert accepted <= drafted / 2
        assert spec.engine.get_stats()["kv_cache"]["num_used_blocks"] == 0
    if "stop" in extra:
        assert want[0]["finish"] == "stop" and len(want[0]["tokens"]) < 24


def test_stats_name_the_method_and_count_the_draft_in_memory(engines, target_dir):
    plain, same, _ = engines
    stats = same.engine.get_stats()
    assert stats["speculative"]["method"] == "draft"
    assert stats["speculative"]["draft_model"] == str(target_dir)
    assert {"acceptance_rate", "tokens_per_step", "accepted_tokens"} <= set(stats["speculative"])
    # The draft's weights (here: the target's twice) and its KV pool are counted.
    assert same.engine.weights_nbytes == 2 * plain.engine.weights_nbytes
    assert same.engine.kv_cap_bytes == 2 * plain.engine.kv_cap_bytes
    assert same.engine.drafter.cache.num_blocks == same.engine.cache.num_blocks


def test_sampled_distribution_is_the_one_without_speculation(engines):
    plain, same, _ = engines
    n, prompt = 600, FEW * 2
    # The draft is the target's argmax; at T = 2 among the top 2 it is sampled about as often
    # as not, so drafts are both accepted and rejected.
    params = SamplingParams(temperature=2.0, top_k=2, max_tokens=4, ignore_eos=True)
    stats = same.engine.speculator.stats
    before = (stats.drafted, stats.accepted)
    want = [tuple(r["tokens"]) for r in run(plain, [prompt] * n, [params] * n)]
    got = [tuple(r["tokens"]) for r in run(same, [prompt] * n, [params] * n)]
    drafted, accepted = stats.drafted - before[0], stats.accepted - before[1]
    assert 0.1 * drafted < accepted < 0.9 * drafted
    for pos in (1, 2):  # each later position (up to 2 and 4 outcomes)
        chi2, df = _chi2_same([t[pos] for t in want], [t[pos] for t in got])
        assert chi2 < CHI2_CRIT[df], (pos, chi2, df)
    chi2, df = _chi2_same([t[1:3] for t in want], [t[1:3] for t in got])
    assert chi2 < CHI2_CRIT[df], (chi2, df)


def test_no_block_leaks_with_aborts_and_preemption(target_dir):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    check_aborts_and_preemption(target_dir, params, speculative="draft",
                                draft_model=str(target_dir))


def test_the_draft_pool_grows_with_the_target_pool(target_dir):
    """A pool that starts small: the draft's grows by the same blocks, output unchanged."""
    opts = dict(block_size=4, max_num_seqs=8, device="cpu", max_num_batched_tokens=32,
                kv_cache_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(str(target_dir), speculative="draft", draft_model=str(target_dir), **opts) as llm:
        start = llm.engine.cache.num_blocks
        got = run(llm, BATCH, [params] * len(BATCH))
        engine = llm.engine
        assert engine.cache.num_blocks > start
        assert engine.drafter.cache.num_blocks == engine.cache.num_blocks
        assert engine.speculator.stats.accepted == engine.speculator.stats.drafted > 0
    with LLM(str(target_dir), **OPTS) as plain:
        assert [g["tokens"] for g in got] == [w["tokens"] for w in run(plain, BATCH, [params] * len(BATCH))]


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, target_dir, qwen_tokenizer_dir):
    wide = write_checkpoint(tmp_path / "wide", qwen_tokenizer_dir, base={**SMALL, "vocab_size": 2048})
    with pytest.raises(ModelLoadError, match="cannot draft for .*vocab_size 2048 != 1024"):
        LLM(str(target_dir), speculative="draft", draft_model=str(wide), device="cpu")
    # Same width, but two tokens' ids swapped in the tokenizer.
    swapped = tmp_path / "swapped"
    shutil.copytree(target_dir, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelLoadError, match="tokenizer maps tokens to other ids"):
        LLM(str(target_dir), speculative="draft", draft_model=str(swapped), device="cpu")


def test_draft_options_are_checked(target_dir):
    with pytest.raises(InvalidRequestError, match="draft_model") as err:
        LLM(str(target_dir), speculative="draft")
    assert err.value.field == "draft_model"
    with pytest.raises(InvalidRequestError, match="draft_model"):
        LLM(str(target_dir), speculative="ngram", draft_model=str(target_dir))


def test_cli_generate_with_a_draft_model(tmp_path, tiny_qwen3_dir, qwen_tokenizer_dir):
    """Text prompts need the tokenizer's whole vocabulary: the full-width tiny checkpoint."""
    from tests.test_cli import run_cli

    draft = write_checkpoint(tmp_path / "draft", qwen_tokenizer_dir,
                             config_overrides={"num_hidden_layers": 1}, seed=1)
    args = ["generate", "Hello there", "--model", str(tiny_qwen3_dir), "-n", "12", "-t", "0",
            "--no-chat", "--no-stream"]
    plain = run_cli(*args)
    spec = run_cli(*args, "--speculative", "draft", "--draft-model", str(draft),
                   "--num-speculative-tokens", "2")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "{target}", "--speculative", "draft"],
     "speculative='draft' needs a draft model"),
    (["generate", "hi", "--model", "{target}", "--speculative", "draft", "--draft-model", "{wide}"],
     "vocab_size 2048 != 1024"),
    (["serve", "--model", "{target}", "--speculative", "draft", "--draft-model", "nosuchmodel",
      "--port", "0"], "unknown model 'nosuchmodel'"),
    (["serve", "--model", "{target}", "--speculative", "eagle", "--port", "0"], "speculative"),
])
def test_cli_draft_errors_are_one_line_and_exit_2(tmp_path, target_dir, qwen_tokenizer_dir,
                                                  args, message):
    from tests.test_cli import run_cli

    wide = write_checkpoint(tmp_path / "wide", qwen_tokenizer_dir, base={**SMALL, "vocab_size": 2048})
    result = run_cli(*[a.format(target=target_dir, wide=wide) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_draft_options_come_from_a_config_file_or_the_environment(tmp_path, monkeypatch):
    from nano_qwen3_mlx.config import EngineConfig

    toml = tmp_path / "spec.toml"
    toml.write_text('[engine]\nspeculative = "draft"\ndraft_model = "qwen3-0.6b"\n'
                    "num_speculative_tokens = 3\n")
    config = EngineConfig.load(toml)
    assert (config.speculative, config.draft_model, config.num_speculative_tokens) == \
        ("draft", "qwen3-0.6b", 3)
    monkeypatch.setenv("SPECULATIVE", "draft")
    monkeypatch.setenv("DRAFT_MODEL", "smollm2-135m")
    assert EngineConfig.load().draft_model == "smollm2-135m"
    assert EngineConfig.load(draft_model="x").draft_model == "x"  # a flag wins


def test_bench_draft_method_against_itself_and_mlx_lm(tiny_qwen3_dir, tmp_path):
    from nano_qwen3_mlx.bench.report import BenchPlan, markdown
    from nano_qwen3_mlx.bench.report import run as run_bench

    plan = BenchPlan(model=str(tiny_qwen3_dir), suites=["speculative"], batches=[1, 2], gen_len=6,
                     speculative={"speculative": "draft", "num_speculative_tokens": 3,
                                  "draft_model": str(tiny_qwen3_dir)})
    rows = run_bench(plan, tmp_path / "r.json", progress=lambda _: None)["speculative"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["ours_plain"]["tokens"] == row["ours_draft"]["tokens"] == row["batch"] * 6
        assert row["ours_plain"]["stats"] is None
        assert row["ours_draft"]["stats"]["method"] == "draft"
        assert row["ours_draft"]["stats"]["acceptance_rate"] == 1.0  # the draft is the target
    one = rows[0]
    assert one["mlx_lm_plain"]["tokens"] == one["mlx_lm_draft"]["tokens"] == 6
    assert one["ratio_vs_mlx_lm_draft"] == pytest.approx(
        one["ours_draft"]["decode_tok_s"] / one["mlx_lm_draft"]["decode_tok_s"])
    assert "mlx_lm_draft" not in rows[1]
    text = markdown(json.loads((tmp_path / "r.json").read_text()))
    assert "Draft model (given pair; target " in text and "| 2 |" in text


def test_server_stats_show_the_draft_method(tiny_qwen3_dir):
    """Over HTTP: a completion with n = 2 at T = 0 (two equal choices, drafted) and /stats."""
    import requests

    from nano_qwen3_mlx.config import EngineConfig, ServerConfig
    from tests.serve_thread import serve_in_thread

    engine = EngineConfig.load(model=str(tiny_qwen3_dir), device="cpu", num_kv_blocks=64,
                               block_size=4, speculative="draft", draft_model=str(tiny_qwen3_dir))
    with serve_in_thread(engine, ServerConfig()) as (url, _):
        body = {"model": str(tiny_qwen3_dir), "prompt": "Hello there", "max_tokens": 12,
                "temperature": 0, "n": 2, "ignore_eos": True}
        reply = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
        texts = [c["text"] for c in reply["choices"]]
        assert len(texts) == 2 and texts[0] == texts[1] and reply["usage"]["completion_tokens"] == 24
        stats = requests.get(f"{url}/stats", timeout=30).json()["speculative"]
    assert stats["method"] == "draft" and stats["draft_model"] == str(tiny_qwen3_dir)
    assert stats["accepted_tokens"] == stats["draft_tokens"] > 0
    assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_step"] > 1

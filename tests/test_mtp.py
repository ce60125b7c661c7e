"""Speculative decoding with the checkpoint's MTP head (engine/mtp.py, models/mtp.py) on tiny
random Qwen3.5 (dense and MoE: the head's layer has experts) and Qwen3-Next checkpoints in the Hugging Face layout (with ``mtp.*``): the
same greedy tokens as without it, batched and under preemption, drafts made, accepted and
rolled back, no KV block or state slot leaked; a clear error where there is no head."""

from __future__ import annotations

import mlx.core as mx
import pytest

from nano_qwen3_mlx import SamplingParams
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.llm_engine import LLMEngine
from nano_qwen3_mlx.models.loader import ModelLoadError
from tests.checkpoints import write_checkpoint, write_hybrid_checkpoint
from tests.test_hybrid_engine import assert_no_leaks, drive
from tests.test_speculative import BIAS
from tests.test_speculative_rows import HYBRID_PROMPTS

OPTS = dict(block_size=4, state_snapshot_interval=8, max_num_batched_tokens=16, max_num_seqs=4,
            device="cpu")


def _edit_mtp(path, edit) -> None:
    """Rewrite the checkpoint's tensors with ``edit(weights)`` applied."""
    weights = mx.load(str(path / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def family_dir(request, tmp_path_factory, qwen_tokenizer_dir):
    return write_hybrid_checkpoint(tmp_path_factory.mktemp(request.param), qwen_tokenizer_dir,
                                   request.param)


def make(path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **(OPTS | {"num_kv_blocks": 64} | options)))


def both(path, prompts, params, **options) -> tuple[dict, LLMEngine]:
    """The tokens with and without MTP (asserted equal) and the MTP engine."""
    plain, spec = make(path, **options), make(path, speculative="mtp", **options)
    want, got = drive(plain, prompts, params), drive(spec, prompts, params)
    assert got == want
    assert_no_leaks(spec)
    return got, spec


@pytest.mark.parametrize("num_kv_blocks, k", [(64, 4), (64, 1), (20, 3)])  # 20: preemption
def test_greedy_tokens_are_the_ones_without_mtp(family_dir, num_kv_blocks, k):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=BIAS)
    _, spec = both(family_dir, HYBRID_PROMPTS[:5], params, num_kv_blocks=num_kv_blocks,
                   num_speculative_tokens=k)
    stats = spec.get_stats()["speculative"]
    assert stats["method"] == "mtp" and stats["draft_tokens"] > 0
    if num_kv_blocks == 20:
        assert spec.scheduler.num_preemptions > 0


def test_sampled_tokens_follow_the_seed_with_mtp(family_dir):
    """T > 0: the rejection keeps each request's seeded stream (drafts are rejected here)."""
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=7)
    both(family_dir, HYBRID_PROMPTS[:3], params)


def test_drafts_are_accepted_and_continue_from_the_last_accepted_token(tmp_path, family_dir):
    """A head with ``fc`` zeroed sees zeros: its logits are all 0, its draft always token 0
    (chained ones too); a target biased to token 0 accepts every draft. So k grows to 4, each
    speculating row emits up to five tokens, and its next first draft is read at the bonus
    token's position."""
    import shutil

    path = shutil.copytree(family_dir, tmp_path / "zero-fc")
    _edit_mtp(path, lambda w: w.update({"mtp.fc.weight": mx.zeros_like(w["mtp.fc.weight"])}))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias={0: 100.0})
    got, spec = both(path, HYBRID_PROMPTS[:3], params)
    assert all(tokens == [0] * 24 for tokens in got.values())
    stats = spec.get_stats()["speculative"]
    assert stats["accepted_tokens"] == stats["draft_tokens"] > 0
    assert stats["tokens_per_step"] > 3


def test_a_checkpoint_without_mtp_weights_is_a_clear_error(tmp_path, qwen_tokenizer_dir, family_dir):
    import shutil

    path = shutil.copytree(family_dir, tmp_path / "no-mtp")
    _edit_mtp(path, lambda w: [w.pop(k) for k in [k for k in w if k.startswith("mtp.")]])
    make(path)  # fine without speculative="mtp"
    with pytest.raises(ModelLoadError, match=r"no mtp\.\* .*speculative='mtp'"):
        make(path, speculative="mtp")
    mlx_dir = write_hybrid_checkpoint(tmp_path / "mlx", qwen_tokenizer_dir, layout="mlx")
    with pytest.raises(ModelLoadError, match="speculative='mtp'"):
        make(mlx_dir, speculative="mtp")
    with pytest.raises(ModelLoadError, match="speculative='mtp'.*qwen3 has no MTP head"):
        make(write_checkpoint(tmp_path / "qwen3", qwen_tokenizer_dir), speculative="mtp")


def test_the_draft_after_decoding_is_the_draft_after_prefilling_the_same_text(family_dir):
    """The head's KV written step by step (decode rows, rejected drafts, corrections) gives
    the draft a fresh engine computes from the same text as one chunked prompt: the next
    tokens, positions and slots of ``follow`` line up with the target's."""
    from types import SimpleNamespace

    spec, seen = make(family_dir, speculative="mtp"), []
    draft_for = spec.drafter.draft_for

    def record(seq):
        found = draft_for(seq)
        if found is not None:
            seen.append((list(seq.token_ids), found[0]))
        return found

    spec.drafter.draft_for = record
    spec.speculator.verified = lambda *args: None  # no back-off: a draft every step
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    drive(spec, [HYBRID_PROMPTS[4]], params)
    assert len(seen) >= 10
    for tokens, draft in seen[::2]:
        fresh = make(family_dir, speculative="mtp")
        fresh.add_request(tokens[:-1], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while not any(out.token_ids for out in fresh.step()):
            pass
        (seq_id,) = fresh.drafter._where
        assert fresh.drafter.draft_for(SimpleNamespace(seq_id=seq_id, token_ids=tokens))[0] == draft


def test_with_a_grammar_the_tokens_are_the_ones_without_mtp(family_dir, qwen_tokenizer_dir):
    """Drafts cut at the first token the grammar forbids, the matcher and the recurrent state
    rolled back: the same tokens."""
    from nano_qwen3_mlx.tokenizer import Tokenizer
    from tests.test_speculative_rows import grammar_case

    tokenizer = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    prompt, bias = grammar_case(tokenizer)
    params = SamplingParams(temperature=0, max_tokens=16, logit_bias=bias, regex="(ab| ab| cd)+")
    both(family_dir, [prompt, prompt[1:], prompt[:-1]], params)  # drafts cut to none here


def test_drafts_a_grammar_allows_are_accepted(tmp_path, family_dir):
    """The zeroed head's drafts (token 0, "!") under a grammar that allows them."""
    import shutil

    path = shutil.copytree(family_dir, tmp_path / "zero-fc")
    _edit_mtp(path, lambda w: w.update({"mtp.fc.weight": mx.zeros_like(w["mtp.fc.weight"])}))
    params = SamplingParams(temperature=0, max_tokens=12, logit_bias={0: 100.0}, regex="!+")
    got, spec = both(path, HYBRID_PROMPTS[:2], params)
    assert all(tokens and set(tokens) == {0} for tokens in got.values())
    stats = spec.get_stats()["speculative"]
    assert stats["accepted_tokens"] == stats["draft_tokens"] > 0


def _prefill_hidden(path, prompt: list[int]) -> mx.array:
    """The model's final hidden state at every prompt position, from one prefill chunk."""
    engine, kept = make(path, speculative="mtp", max_num_batched_tokens=256), []
    follow = engine.drafter.follow

    def keep(batch, prev, out):
        kept.append(out.hidden)
        follow(batch, prev, out)

    engine.drafter.follow = keep
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert kept[0].shape[0] == len(prompt)
    return kept[0]


class DenseContext:
    """One sequence, causal attention over the call's own keys (an oracle for the paged
    pool: no slots, no block tables)."""

    offsets = 0

    def attend(self, layer_idx, queries, keys, values, scale):
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                    mask="causal")

    def output_rows(self, layer_idx):
        return None


def _sharpen(weights) -> None:
    """The head's attention made peaky (q_norm, k_norm x 4: scores x 16), so a wrong position
    or slot changes its output (a random head attends almost uniformly)."""
    for name in ("q_norm", "k_norm"):
        key = f"mtp.layers.0.self_attn.{name}.weight"
        weights[key] = (weights[key] + 1.0) * 4.0 - 1.0  # stored zero-centred


def test_chained_drafts_are_the_dense_heads_predictions(tmp_path, family_dir):
    """Drafts 1 and 2 of a decoding sequence equal the head run densely over the whole text
    (the model's hidden states from one prefill), draft 2 on draft 1 and the head's own
    output: the paged slots, positions and next tokens of ``follow`` and ``chain`` agree."""
    import shutil

    path = shutil.copytree(family_dir, tmp_path / "sharp")
    _edit_mtp(path, _sharpen)
    spec, seen = make(path, speculative="mtp", num_speculative_tokens=2), []
    spec.speculator.verified = lambda *args: None  # no back-off: k = 2 every step
    chain = spec.drafter.chain

    def record(batch, rows):
        drafts = chain(batch, rows)
        seen.extend((list(batch.seqs[i].token_ids), d) for (i, _, _), d in zip(rows, drafts))
        return drafts

    spec.drafter.chain = record
    drive(spec, [HYBRID_PROMPTS[4]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    seen = [(tokens, d) for tokens, d in seen if len(d) == 2]  # (max_tokens cuts the last)
    assert len(seen) >= 4
    model = spec.model
    for tokens, (d1, d2) in seen[::2]:
        hidden = _prefill_hidden(path, tokens[:-1])
        out = model.mtp_hidden_states(mx.array([tokens[1:]]), hidden[None], DenseContext())[0]
        assert mx.argmax(model.compute_logits(out[-1])).item() == d1
        out = model.mtp_hidden_states(mx.array([tokens[1:] + [d1]]),
                                      mx.concatenate([hidden, out[-1:]])[None], DenseContext())[0]
        assert mx.argmax(model.compute_logits(out[-1])).item() == d2

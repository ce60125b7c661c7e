"""The speculative suite's draft-model method: this engine with and without a draft model, and
against mlx-lm's draft-model generation (``stream_generate(..., draft_model=...)``, one
stream: mlx-lm has no batched draft-model decoding), on the same target + draft pair.

No small and large checkpoint of one family is at hand offline, so the default pair is
built, and labelled as built: the draft is a random Qwen3 (``DRAFT_SHAPE``); the target is
the draft plus ``EXTRA_LAYERS`` random layers whose output projections (``o_proj``,
``down_proj``) are scaled by ``EXTRA_SCALE``, inserted before the final norm. The extra layers
nudge the residual stream a little, so the target's greedy tokens mostly agree with the
draft's (as a real family's do) while a target token costs several draft tokens. A real
pair is given with ``--model`` (target) and ``--draft-model``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from .engines import MlxLm, Ours, Req, measure
from .metrics import StreamTimes, ratio, summary
from .shapes import make_prompts, parameter_counts, random_checkpoint

# The draft: 4 layers of width 512 and a 32K vocabulary, so the lm_head does not dominate
# (with Qwen3's 152K, a small model's cost is mostly the lm_head, no draft's shape).
DRAFT_SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1536,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
               "vocab_size": 32768, "tie_word_embeddings": False}
EXTRA_LAYERS, EXTRA_SCALE = 20, 0.005
PROMPT_LEN = 64


def build_pair(folder: Path, dtype: str = "float32") -> tuple[Path, Path]:
    """(target, draft) checkpoint folders under ``folder`` (see the module docstring)."""
    draft = folder / "draft"
    draft.mkdir(parents=True, exist_ok=True)
    random_checkpoint(DRAFT_SHAPE, dtype, draft)
    config = json.loads((draft / "config.json").read_text())
    weights = mx.load(str(draft / "model.safetensors"))
    n = config["num_hidden_layers"]
    mx.random.seed(1)
    for layer in range(n, n + EXTRA_LAYERS):  # copies of random layers, outputs scaled down
        src = int(mx.random.randint(0, n, ()).item())
        for key in [k for k in weights if k.startswith(f"model.layers.{src}.")]:
            new = key.replace(f"model.layers.{src}.", f"model.layers.{layer}.")
            noise = mx.random.normal(weights[key].shape).astype(weights[key].dtype)
            w = noise * weights[key].std() if weights[key].ndim == 2 else weights[key]
            scale = EXTRA_SCALE if key.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            weights[new] = w * scale
    target = folder / "target"
    target.mkdir(exist_ok=True)
    mx.save_safetensors(str(target / "model.safetensors"), weights)
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n + EXTRA_LAYERS}))
    for f in draft.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (target / f.name).write_bytes(f.read_bytes())
    return target, draft


class MlxLmDraft(MlxLm):
    """mlx-lm's one-stream generation, with ``draft`` as its draft model when given."""

    name = "mlx-lm (draft model)"

    def __init__(self, path: Path, draft: Path | None, num_draft_tokens: int) -> None:
        from mlx_lm import load

        self.draft = load(str(draft))[0] if draft is not None else None
        self.num_draft_tokens = num_draft_tokens
        super().__init__(path, 1)

    def _stream(self, req: Req) -> StreamTimes:
        from mlx_lm import stream_generate

        opts = {"draft_model": self.draft, "num_draft_tokens": self.num_draft_tokens} \
            if self.draft is not None else {}
        st, start = StreamTimes(), time.perf_counter()
        st.arrive(req.name, 0.0)
        for _ in stream_generate(self.model, self.tokenizer, req.prompt, max_tokens=req.gen_len,
                                 **opts):
            st.record(req.name, time.perf_counter() - start)
        return st

    def close(self) -> None:
        del self.draft
        super().close()


def run(settings, batches: list[int], gen_len: int, spec: dict[str, Any], folder: Path,
        progress=print) -> list[dict[str, Any]]:
    """Decode tok/s of the target alone and with the draft (ours at each batch size; mlx-lm
    at one stream), greedy, best of two runs each."""
    if spec.get("draft_model"):
        target, draft, label = Path(settings.path), Path(spec["draft_model"]), "given pair"
    else:
        target, draft = build_pair(folder)
        label = (f"built pair: the draft's {DRAFT_SHAPE['num_hidden_layers']} layers + "
                 f"{EXTRA_LAYERS} random layers with outputs x{EXTRA_SCALE}")
    sizes = {name: parameter_counts(path)["total"] / 1e6 for name, path in
             (("target", target), ("draft", draft))}
    label += f"; target {sizes['target']:.0f}M, draft {sizes['draft']:.0f}M parameters"
    k = spec.get("num_speculative_tokens", 4)
    options = {**settings.engine_options, "max_num_batched_tokens": settings.max_num_batched_tokens}
    ours = {"plain": {}, "draft": {"speculative": "draft", "draft_model": str(draft),
                                   "num_speculative_tokens": k}}
    rows = []
    for batch in batches:
        prompts = make_prompts(batch, PROMPT_LEN, vocab=DRAFT_SHAPE["vocab_size"], seed=91 + batch)
        reqs = [Req(f"r{i}", p, gen_len) for i, p in enumerate(prompts)]
        row = {"pair": label, "batch": batch, "gen_len": gen_len, "load_avg_before": os.getloadavg()[0]}
        runs = {f"ours_{name}": (lambda o=opts, r=reqs: _ours(target, r, o, options))
                for name, opts in ours.items()}
        if batch == 1:
            runs |= {f"mlx_lm_{name}": (lambda d=d, r=reqs: _mlx_lm(target, d, k, r))
                     for name, d in (("plain", None), ("draft", draft))}
        for _ in range(2):
            for name, once in runs.items():
                got = once()
                if name not in row or got["decode_tok_s"] > row[name]["decode_tok_s"]:
                    row[name] = got
        row["ratio_draft_vs_plain"] = ratio(row["ours_draft"]["decode_tok_s"], row["ours_plain"]["decode_tok_s"])
        if batch == 1:
            row["mlx_lm_draft_vs_plain"] = ratio(row["mlx_lm_draft"]["decode_tok_s"],
                                                 row["mlx_lm_plain"]["decode_tok_s"])
            row["ratio_vs_mlx_lm_draft"] = ratio(row["ours_draft"]["decode_tok_s"],
                                                 row["mlx_lm_draft"]["decode_tok_s"])
        row["load_avg_after"] = os.getloadavg()[0]
        stats = row["ours_draft"].get("stats") or {}
        progress(f"draft model x {batch}: decode tok/s plain {row['ours_plain']['decode_tok_s']:.2f}, "
                 f"draft {row['ours_draft']['decode_tok_s']:.2f} ({row['ratio_draft_vs_plain']:.2f}x); "
                 f"acceptance {stats.get('acceptance_rate', 0):.2f}")
        rows.append(row)
    return rows


class _Ours(Ours):
    """This engine; keeps its speculative counters when it is dropped."""

    def close(self) -> None:
        self.spec_stats = self.engine.get_stats().get("speculative")
        super().close()


def _ours(target: Path, reqs: list[Req], opts: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    engines: list[_Ours] = []
    max_tokens = sum(len(r.prompt) + r.gen_len for r in reqs)

    def make() -> _Ours:
        engines.append(_Ours(target, len(reqs), max_tokens, **options, **opts))
        return engines[-1]

    st, _ = measure(make, reqs)
    return summary(st) | {"stats": engines[0].spec_stats}


def _mlx_lm(target: Path, draft: Path | None, k: int, reqs: list[Req]) -> dict[str, Any]:
    st, _ = measure(lambda: MlxLmDraft(target, draft, k), reqs)
    return summary(st)


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"Draft model ({rows[0]['pair'] if rows else ''}), greedy:", "",
             "| batch | decode tok/s ours plain | ours + draft | ratio | acceptance | tokens per "
             "speculating step | mlx-lm plain | mlx-lm + draft | mlx-lm ratio | ours + draft vs "
             "mlx-lm + draft | load avg |", "|" + "---:|" * 11]
    for r in rows:
        stats = r["ours_draft"].get("stats") or {}
        peer = r.get("mlx_lm_plain"), r.get("mlx_lm_draft")
        cells = [f"{p['decode_tok_s']:.2f}" if p else "n/a" for p in peer]
        lines.append(f"| {r['batch']} | {r['ours_plain']['decode_tok_s']:.2f} | "
                     f"{r['ours_draft']['decode_tok_s']:.2f} | {r['ratio_draft_vs_plain']:.2f}x | "
                     f"{stats.get('acceptance_rate', 0):.2f} | {stats.get('tokens_per_step', 0):.2f} | "
                     f"{cells[0]} | {cells[1]} | {_x(r.get('mlx_lm_draft_vs_plain'))} | "
                     f"{_x(r.get('ratio_vs_mlx_lm_draft'))} | {r['load_avg_before']:.1f} |")
    return lines


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"

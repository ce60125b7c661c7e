"""A toy hybrid model for engine tests: attention layers from ``models/decoder.py`` beside toy
recurrent layers that keep a convolution window and a decaying matrix state per sequence (the
shapes Gated DeltaNet keeps), reached only through ``ctx.recur`` as the contract says.

``greedy_reference`` runs it on ``DenseCache`` (the reference), one request at a time.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.llm_engine import LLMEngine
from nano_qwen3_mlx.models.base import DenseCache, count_parameters
from nano_qwen3_mlx.models.contract import LayerKV, LayerState
from nano_qwen3_mlx.models.decoder import MLP, Attention, DecoderArgs
from nano_qwen3_mlx.models.loader import LoadedModel

VOCAB = 256
K = 4  # convolution width: the state keeps the last K - 1 inputs


class ToyRecurrent(nn.Module):
    """q, k, v from a causal depthwise convolution; ``S <- g * S + v k^T``, ``o = S q``."""

    def __init__(self, dim: int, state_idx: int, heads: int = 2, dk: int = 6, dv: int = 4) -> None:
        super().__init__()
        self.state_idx, self.heads, self.dk, self.dv = state_idx, heads, dk, dv
        self.conv_dim = heads * (2 * dk + dv)
        self.in_proj = nn.Linear(dim, self.conv_dim, bias=False)
        self.conv_weight = mx.random.normal((K, self.conv_dim)) * 0.5
        self.gate = nn.Linear(dim, heads)
        self.out_proj = nn.Linear(heads * self.dv, dim, bias=False)

    def state(self, dtype: mx.Dtype) -> LayerState:
        return LayerState(((K - 1, self.conv_dim), (self.heads, self.dv, self.dk)),
                          (dtype, mx.float32))

    def __call__(self, x: mx.array, ctx) -> mx.array:
        return ctx.recur(self.state_idx, (x,), self.step)

    def step(self, inputs: tuple[mx.array, ...], states: list[mx.array]):
        (x,), (window, S) = inputs, states
        b, n, _ = x.shape
        u = self.in_proj(x)
        full = mx.concatenate([window.astype(u.dtype), u], axis=1)  # (b, K - 1 + n, C)
        conv = nn.silu(sum(full[:, i:i + n] * self.conv_weight[i] for i in range(K)))
        H, dk = self.heads, self.dk
        q = conv[..., :H * dk].reshape(b, n, H, dk)
        k = conv[..., H * dk:2 * H * dk].reshape(b, n, H, dk)
        k = k / mx.maximum(mx.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
        v = conv[..., 2 * H * dk:].reshape(b, n, H, self.dv)
        g = mx.sigmoid(self.gate(x)).astype(mx.float32)  # (b, n, H) decay
        outs = []
        for t in range(n):
            S = g[:, t, :, None, None] * S + v[:, t, :, :, None] * k[:, t, :, None, :]
            outs.append((S @ q[:, t, :, :, None].astype(mx.float32))[..., 0])  # (b, H, dv)
        o = mx.stack(outs, axis=1).reshape(b, n, H * self.dv).astype(x.dtype)
        return self.out_proj(o), [full[:, n:], S]


class ToyLayer(nn.Module):
    def __init__(self, args: DecoderArgs, kind: str, idx: int) -> None:
        super().__init__()
        self.kind, self.idx = kind, idx
        self.mixer = Attention(args, idx) if kind == "A" else ToyRecurrent(args.hidden_size, idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.norm1 = nn.RMSNorm(args.hidden_size)
        self.norm2 = nn.RMSNorm(args.hidden_size)

    def __call__(self, x: mx.array, ctx) -> mx.array:
        rows = ctx.output_rows(self.idx) if self.kind == "A" else None
        h = self.mixer(self.norm1(x), ctx)
        h = h + (x if rows is None else x[rows])
        return h + self.mlp(self.norm2(h))


class ToyHybridLM(nn.Module):
    """Layers by ``pattern`` ("R": recurrent, "A": attention); implements ``CausalLM``."""

    def __init__(self, pattern: str = "RARA", dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        mx.random.seed(seed)
        self.args = DecoderArgs(model_type="toy_hybrid", hidden_size=dim, num_hidden_layers=0,
                                intermediate_size=2 * dim, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB,
                                max_position_embeddings=4096, use_qk_norm=True)
        counts = {"A": 0, "R": 0}
        self.layers = []
        for kind in pattern:
            self.layers.append(ToyLayer(self.args, kind, counts[kind]))
            counts[kind] += 1
        self.embed = nn.Embedding(VOCAB, dim)
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        mx.eval(self.parameters())

    model_type = "toy_hybrid"
    vocab_size = VOCAB
    max_position_embeddings = 4096

    @property
    def dtype(self) -> mx.Dtype:
        return self.norm.weight.dtype

    @property
    def kv_layers(self) -> list[LayerKV]:
        return [LayerKV(2, self.args.head_dim) for layer in self.layers if layer.kind == "A"]

    @property
    def state_layers(self) -> list[LayerState]:
        return [layer.mixer.state(self.dtype) for layer in self.layers if layer.kind == "R"]

    def hidden_states(self, input_ids: mx.array, ctx) -> mx.array:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)

    def compute_logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(hidden)

    def num_parameters(self) -> dict[str, int]:
        total = count_parameters(self)
        return {"total": total, "active": total}


def greedy_reference(model: ToyHybridLM, prompt: list[int], max_tokens: int
                     ) -> tuple[list[int], list[mx.array]]:
    """Greedy tokens and each step's last-row logits, one request on ``DenseCache``."""
    cache = DenseCache(len(model.kv_layers), model.state_layers)
    ids, tokens, logits = mx.array([prompt]), [], []
    for _ in range(max_tokens):
        last = model.compute_logits(model.hidden_states(ids, cache))[0, -1]
        cache.advance(ids.shape[1])
        logits.append(last)
        tokens.append(int(mx.argmax(last)))
        ids = mx.array([[tokens[-1]]])
    return tokens, logits


def toy_engine(model: ToyHybridLM, tokenizer_dir: Path, **options) -> LLMEngine:
    """An engine on ``model`` (CPU, float32) with the real Qwen3 tokenizer."""
    from nano_qwen3_mlx.tokenizer import Tokenizer

    config = EngineConfig(model="toy-hybrid", **options)
    loaded = LoadedModel(model, Tokenizer.from_pretrained(tokenizer_dir), {}, tokenizer_dir,
                         "toy-hybrid")
    return LLMEngine(config, loaded)

"""``LLM``: the synchronous face of the engine (it drives ``step()`` itself)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .config import EngineConfig, engine_config
from .engine.llm_engine import LLMEngine
from .errors import InvalidRequestError
from .outputs import GenerationResult, add_reasoning
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate text with a Qwen3 (or Llama-family) model, batching all prompts together.

    ``LLM(model=None, **engine_options)``: ``model`` is an alias (``qwen3-0.6b``,
    ``smollm2-135m``), a local directory or ``.gguf`` file, or a Hugging Face repo id;
    options are ``EngineConfig`` fields (``kv_cache_gb`` caps the KV pool, which starts small
    and grows on demand; ``num_kv_blocks`` fixes it; ``kv_cache_dtype="int8"`` quantizes it;
    ``prefix_cache_dir`` and ``prefix_cache_disk_gb`` keep the prefix cache on disk too;
    ``speculative="ngram"`` drafts tokens by prompt lookup and verifies them in the same step
    (output unchanged, ``num_speculative_tokens`` at most per step), ``speculative="draft",
    draft_model="..."`` drafts them with a smaller model of the same tokenizer;
    ``max_tokens_default``, ...); a bad one raises ``InvalidRequestError``. Sampling
    fields a request leaves out take the model's defaults (``engine.sampling_defaults``).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 **engine_options: Any) -> None:
        self.config = engine_config(config, model, engine_options)
        self.engine = LLMEngine(self.config)
        if self.engine.world.is_follower:  # under mlx.launch: run rank 0's steps, then exit
            self.engine.dist.follow()
        self.tokenizer = self.engine.tokenizer

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[dict[str, Any]]:
        """Generate for one or many prompts (strings or token-id lists), batched together.

        ``sampling_params`` is one for all prompts, or a list with one per prompt.
        """
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        builders: list[GenerationResult] = []
        try:
            for prompt, p in zip(prompts, params):
                builders.append(self._add(prompt, p))
        except ValueError:  # one bad prompt: run none of them
            for builder in builders:
                self.engine.abort_request(builder.request_id)
            self._drain()
            raise
        by_id = {b.request_id: b for b in builders}
        while not all(b.finished for b in builders):
            for out in self.engine.step():
                if out.request_id in by_id:
                    by_id[out.request_id].add(out)
        return [b.as_dict() for b in builders]

    def generate_single(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> dict[str, Any]:
        return self.generate([prompt], sampling_params)[0]

    def generate_stream(self, prompt: Prompt,
                        sampling_params: SamplingParams | None = None) -> Iterator[dict[str, Any]]:
        """Yield chunks ``{"text", "token_ids", "finished", "finish_reason", ...}``."""
        builder = self._add(prompt, sampling_params)
        try:
            while not builder.finished:
                for out in self.engine.step():
                    if out.request_id == builder.request_id:
                        builder.add(out)
                        yield out.as_chunk()
        finally:
            if not builder.finished:  # the caller stopped iterating: free the blocks
                self.engine.abort_request(builder.request_id)
                self._drain()

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
             **chat_template_kwargs: Any) -> dict[str, Any]:
        """Chat with the model; ``reasoning_content`` holds Qwen3 thinking when present."""
        prompt = self._render(messages, chat_template_kwargs)
        result = self.generate([prompt], sampling_params)[0]
        return add_reasoning(result, self.tokenizer, prompt)

    def embed(self, prompts: Prompt | list[Prompt]) -> list[list[float]]:
        """L2-normalised last-token embeddings, batched (strings or token-id lists)."""
        from .embeddings import embedding_ids

        prompts = [embedding_ids(self.tokenizer, p) if isinstance(p, str) else p
                   for p in _as_prompt_list(prompts)]
        ids: list[str] = []
        try:
            for p in prompts:
                ids.append(self.engine.add_request(p, SamplingParams(max_tokens=1), pooling=True))
        except ValueError:  # one bad prompt: run none of them
            for request_id in ids:
                self.engine.abort_request(request_id)
            self._drain()
            raise
        vectors: dict[str, list[float] | None] = {}
        while len(vectors) < len(ids):
            vectors |= {o.request_id: o.embedding for o in self.engine.step() if o.finished}
        if any(vectors[i] is None for i in ids):
            raise RuntimeError("an embedding request failed inside the engine")
        return [vectors[i] for i in ids]

    # ---- misc ---------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def close(self) -> None:
        """Abort anything unfinished (frees every KV block); finish the disk tier's writes."""
        self.engine.abort_all()
        self._drain()
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _add(self, prompt: Prompt, params: SamplingParams | None) -> GenerationResult:
        return GenerationResult(self.engine.add_request(prompt, params))

    def _render(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()


def _per_prompt(params: SamplingParams | list[SamplingParams] | None,
                n: int) -> list[SamplingParams | None]:
    if not isinstance(params, list):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} sampling_params for {n} prompts",
                                  field="sampling_params")
    return params


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one token-id prompt
    return list(prompts)

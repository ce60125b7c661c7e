"""The batching engine: sequences, paged KV cache, scheduler, model runner, sampler."""

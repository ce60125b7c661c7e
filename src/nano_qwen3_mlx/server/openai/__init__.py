"""The OpenAI APIs: chat completions, completions, responses, embeddings, and their fields."""

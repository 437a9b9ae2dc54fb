"""Serving: an OpenAI-compatible chat-completions server with continuous batching and a chat page
(``python -m mllm_jax.serve``; docs/serving.md)."""

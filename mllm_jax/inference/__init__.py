"""Inference: batched, jitted generation with a KV cache."""

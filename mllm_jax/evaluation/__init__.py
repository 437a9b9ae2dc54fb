"""Evaluation: metrics and tasks run during training and by ``mllm_jax.evaluate``."""

"""mllm_jax: train and serve multimodal LLMs (LLaVA, BLIP-2, Flamingo) in JAX/Flax."""

__version__ = "0.1.0"

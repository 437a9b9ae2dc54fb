"""Evaluation tasks: standard-format data loaders (``loaders``) and grounding location tokens (``boxes``).

Metrics live in ``mllm_jax.eval.metrics``; docs/evaluation.md describes every task and its data format.
"""

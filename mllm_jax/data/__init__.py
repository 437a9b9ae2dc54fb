"""Data: the built-in synthetic dataset, tokenizers and (host-side, numpy) input pipelines."""

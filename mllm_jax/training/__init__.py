"""Training: the run config, the train step and loop, optimizer, LoRA, checkpoints, metrics."""

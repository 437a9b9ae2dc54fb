"""Pure Flax (linen) modules: layers, vision towers, decoders, adapters and the composite models."""

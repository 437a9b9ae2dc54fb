"""Checks every decoder (``Llm``, ``Opt``) must pass, shared by their tests."""

import chex
import jax
import jax.numpy as jnp
import numpy as np


def forward(model, params, tokens, **kw):
    """Logits of ``tokens`` (embedded by the model itself), without a cache."""
    return model.apply({"params": params}, model.apply({"params": params}, tokens, method="embed"), **kw)[0]


def assert_causal(model, params, width: int):
    """The logits at position t have no gradient from the inputs after t, and some from those up to t."""
    embeds = jax.random.normal(jax.random.key(2), (1, 8, width))
    t = 3
    grad = jax.jit(jax.grad(lambda e: model.apply({"params": params}, e)[0][0, t].sum()))(embeds)
    assert np.all(np.asarray(grad[0, t + 1 :]) == 0)
    assert np.any(np.asarray(grad[0, : t + 1]) != 0)


def assert_cached_decoding_matches(model, params, cache, vocab: int, explicit_positions: bool = True):
    """A 5-token prefill and 4 one-token steps through ``cache`` give the logits of one full forward.
    ``explicit_positions``: pass each chunk's positions (else the model derives them from the cache)."""
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, vocab)
    full = jax.jit(lambda p, t: forward(model, p, t))(params, tokens)

    @jax.jit
    def step(tokens, positions, cache, index):
        embeds = model.apply({"params": params}, tokens, method="embed")
        return model.apply(
            {"params": params}, embeds, positions if explicit_positions else None, None, cache, index
        )

    prefill = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = step(tokens[:, :5], prefill, cache, jnp.zeros((2,), jnp.int32))
    steps = [logits]
    for i in range(5, 9):
        pos = jnp.full((2, 1), i)
        logits, cache = step(tokens[:, i : i + 1], pos, cache, pos[:, 0])
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)

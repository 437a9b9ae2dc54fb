"""Next-token cross-entropy without the full ``[B, T, V]`` float32 logits (``stages.<name>.loss_chunk``).

The model runs up to its LM head, whose input (the final hidden states ``[B, T, D]``) is taken instead
of the logits; the head is then applied to ``chunk`` tokens at a time inside a ``lax.scan`` whose body
is rematerialised, so the forward keeps one chunk's logits alive and the backward recomputes each
chunk's logits from its hidden states. Per token the arithmetic is the unchunked loss's (the same
log-softmax of the same f32 logits); only the order of the sums differs.

Every decoder's LM head is its ``head`` method (``llm.Decoder``, IDEFICS' and LLaMA-Adapter's
decoders): a Flax method interceptor returns that method's input in place of its output, and records
which submodule it belongs to so the chunks can call the same method with the same params.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEAD_METHOD = "head"


def final_hidden(model, variables: dict, *args, **kwargs):
    """``(hidden_BxTxD, head_path)``: ``model.apply(variables, *args, **kwargs)`` stopped at its LM head's
    input; ``head_path`` names the submodule whose ``head`` it is."""
    paths = []

    def take_input(next_fun, args, kwargs, context):
        if context.method_name != HEAD_METHOD:
            return next_fun(*args, **kwargs)
        paths.append(context.module.path)
        return args[0]

    with nn.intercept_methods(take_input):
        hidden_BxTxD, _ = model.apply(variables, *args, **kwargs)
    if len(paths) != 1:
        raise ValueError(f"expected one LM head call in {type(model).__name__}, saw {len(paths)}")
    return hidden_BxTxD, paths[0]


def head_fn(model, variables: dict, path: tuple[str, ...]):
    """``x_BxTxD -> logits_BxTxV`` of the ``head`` at ``path`` in ``model``."""

    def apply_head(module, x_BxTxD):
        for name in path:
            module = getattr(module, name)
        return getattr(module, HEAD_METHOD)(x_BxTxD)

    return lambda x_BxTxD: model.apply(variables, x_BxTxD, method=apply_head)


@jax.custom_vjp
def token_nll(logits_BxTxV, targets_BxT):
    """``-log_softmax(logits)[target]`` per token (f32 logits). Its gradient is written out,
    ``(softmax - onehot(target)) * g`` in one pass with the one-hot from an iota: autodiff of
    ``take_along_axis`` scatters into a zero ``[B, T, V]`` buffer and differentiates the log-softmax
    in further passes."""
    return _nll_fwd(logits_BxTxV, targets_BxT)[0]


def _nll_fwd(logits_BxTxV, targets_BxT):
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return lse_BxT - picked_BxT, (logits_BxTxV, lse_BxT, targets_BxT)


def _nll_bwd(residuals, g_BxT):
    logits_BxTxV, lse_BxT, targets_BxT = residuals
    onehot_BxTxV = jnp.arange(logits_BxTxV.shape[-1]) == targets_BxT[..., None]
    probs_BxTxV = jnp.exp(logits_BxTxV - lse_BxT[..., None])
    dlogits_BxTxV = (probs_BxTxV - onehot_BxTxV) * g_BxT[..., None]
    # integer targets take a float0 cotangent
    return dlogits_BxTxV.astype(logits_BxTxV.dtype), np.zeros(targets_BxT.shape, jax.dtypes.float0)


token_nll.defvjp(_nll_fwd, _nll_bwd)


def token_sums(logits_BxTxV, targets_BxT, mask_BxT):
    """Summed NLL and correct argmax over the tokens ``mask`` marks (f32 logits)."""
    nll_BxT = token_nll(logits_BxTxV, targets_BxT)
    correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
    return (nll_BxT * mask_BxT).sum(), (correct_BxT * mask_BxT).sum()


def chunked_sums(head, hidden_BxTxD, targets_BxT, mask_BxT, chunk: int):
    """``token_sums`` of ``head(hidden)`` computed ``chunk`` tokens at a time (T padded to a multiple,
    the padding masked out)."""
    b, t, d = hidden_BxTxD.shape
    n = math.ceil(t / chunk)
    pad = n * chunk - t
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        mask_BxT = jnp.pad(mask_BxT, ((0, 0), (0, pad)))
    # [n, B, C, ...]: the scan runs over the chunks
    h_NxBxCxD = hidden_BxTxD.reshape(b, n, chunk, d).swapaxes(0, 1)
    y_NxBxC = targets_BxT.reshape(b, n, chunk).swapaxes(0, 1)
    m_NxBxC = mask_BxT.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward recomputes a chunk's logits instead of keeping them all
    def one(h_BxCxD, y_BxC, m_BxC):
        return token_sums(head(h_BxCxD), y_BxC, m_BxC)

    def body(carry, xs):
        nll, correct = one(*xs)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (nll, correct), _ = jax.lax.scan(body, (zero, zero), (h_NxBxCxD, y_NxBxC, m_NxBxC))
    return nll, correct

"""Direct preference optimisation (Rafailov et al. 2023), the preference stage of LLaVA-RLHF, RLHF-V and
POVID: ``config.stages.<name>.loss="dpo"`` with ``beta``, on pair batches (``data/preference.py``:
``tokens``, ``targets``, ``loss_mask``, ``attention_mask`` ``[B, 2, T]``, row 0 chosen, row 1 rejected;
``images [B, I, Y, X, C]`` once per pair).

Per pair, with ``log pi(y|x)`` summed over the answer's tokens::

    margin = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss   = -log sigmoid(margin)

The reference is the stage's starting params, frozen: ``step.init_state`` keeps a copy of the trainable
params as ``state["reference"]`` (with LoRA, none: the reference is the base with the adapters off, the
frozen params themselves), and ``step.make_train_step`` runs ``reference_logps`` on it in the same jitted
step, before the policy's forward and backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.training import xent

REFERENCE = "reference_logps"  # the batch key reference_logps adds: f32[B, 2]
# a pair's model FLOPs in training sequences (6·N·tokens each): its two rows forward and backward, plus the
# reference's forward of both (2·N each)
SEQUENCES_PER_PAIR = 2 * (1 + 1 / 3)


def sequence_logps(model, params, batch) -> jax.Array:
    """``f32[B, 2]``: the summed log-probability of each pair row's target tokens."""
    tokens_Bx2xT = batch["tokens"]
    b, two, t = tokens_Bx2xT.shape
    flat = lambda x: x.reshape(b * two, *x.shape[2:])  # noqa: E731
    # the pair's two rows see the same images (and InstructBLIP's instruction)
    extra = (
        {"qformer_tokens_BxT": flat(batch["text_tokens"]), "qformer_mask_BxT": flat(batch["text_mask"])}
        if "text_tokens" in batch
        else {}
    )
    images = batch["images"]
    images_2BxIxYxXxC = jnp.repeat(images, two, axis=0) if images is not None else None
    logits_2BxTxV, _ = model.apply(
        {"params": params},
        flat(tokens_Bx2xT),
        images_2BxIxYxXxC,
        None,
        flat(batch["attention_mask"]),
        **extra,
    )
    target_2BxT = -xent.token_nll(logits_2BxTxV.astype(jnp.float32), flat(batch["targets"]))
    return (target_2BxT * flat(batch["loss_mask"]).astype(jnp.float32)).sum(-1).reshape(b, two)


def reference_logps(model, params, batch) -> dict:
    """``{REFERENCE: f32[B, 2]}`` of the reference params (no gradient flows into them)."""
    return {REFERENCE: jax.lax.stop_gradient(sequence_logps(model, params, batch))}


def dpo_loss(model, params, batch, rng, beta: float):
    """``(loss_sum, aux)`` as ``step.make_train_step`` takes them: summed over the B pairs, ``count`` = B;
    aux ``dpo/loss``, ``dpo/reward_margin``, ``dpo/accuracy`` (share of pairs whose margin is > 0),
    ``dpo/chosen_reward``, ``dpo/rejected_reward`` (sums, logged per pair)."""
    del rng
    policy_Bx2 = sequence_logps(model, params, batch)
    rewards_Bx2 = beta * (policy_Bx2 - batch[REFERENCE])
    margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    loss_B = -jax.nn.log_sigmoid(margin_B)
    won = (margin_B > 0).astype(jnp.float32)
    aux = {
        "count": jnp.float32(margin_B.shape[0]),
        "correct": won.sum(),
        "dpo/loss": loss_B.sum(),
        "dpo/reward_margin": margin_B.sum(),
        "dpo/accuracy": won.sum(),
        "dpo/chosen_reward": rewards_Bx2[:, 0].sum(),
        "dpo/rejected_reward": rewards_Bx2[:, 1].sum(),
    }
    return loss_B.sum(), aux

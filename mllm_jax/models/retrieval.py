"""Retrieval as output, FROMAGe's way (Koh et al., 2023): a ``[RET]`` token ends a caption, and the
decoder's last hidden state there (the LM head's input), through a linear map, is trained contrastively
against the image's embedding, the vision tower's pooled output through another linear map (CLIP's
post-LayerNorm class token), with InfoNCE over the batch, both directions, beside the LM loss.

``RetrievalLlava`` is LLaVA with that head (``config.model.retrieval``, families/llava.py): params
``vision``, ``adapter``, ``llm`` exactly as LLaVA's, plus ``retrieval`` (``text_proj``, ``image_proj``,
``logit_scale``). ``__call__`` is LLaVA's (generation does not change); training calls
``train_outputs``, which also returns the contrastive loss (``training/step.py``), and retrieval
calls ``text_embeddings`` / ``image_embeddings`` (``evaluation/synthetic_retrieval.py``).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, Part
from mllm_jax.models.mllm import Llava, LlavaConfig, per_image, splice_images
from mllm_jax.models.vit import select_features

RET_TOKEN = "[RET]"
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learned inverse temperature
NEG = -1e9  # the logit of a batch row that has no [RET] (it is no candidate)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    dim: int = 0  # E, the shared embedding width (FROMAGe: 256); 0: no retrieval head
    weight: float = 1.0  # the contrastive loss's weight beside the LM loss (FROMAGe: 1)
    temperature: float = 0.07  # initial; learned (as CLIP's logit scale, clamped at 100)
    token_id: int = -1  # [RET]: the family fills it in from the tokenizer

    def validate(self):
        if self.dim < 1:
            raise ValueError(f"retrieval.dim must be >= 1, got {self.dim}")
        if self.token_id < 0:
            raise ValueError(f"retrieval.token_id must be the {RET_TOKEN} token's id, got {self.token_id}")
        if not self.weight >= 0 or not self.temperature > 0:
            raise ValueError(
                f"retrieval.weight >= 0 and temperature > 0, got {self.weight}, {self.temperature}"
            )


@dataclasses.dataclass(frozen=True)
class RetrievalLlavaConfig(LlavaConfig):
    retrieval: RetrievalConfig = RetrievalConfig()

    def validate(self):
        super().validate()
        self.retrieval.validate()
        if not self.vision.class_token:
            raise ValueError("retrieval embeds an image by its class token: the vision tower needs one")


def last_token_index(tokens_BxT, token_id: int):
    """``(index_B, present_B)``: where each row's last ``token_id`` is, and whether it has one."""
    hit_BxT = tokens_BxT == token_id
    index_B = jnp.argmax(jnp.where(hit_BxT, jnp.arange(tokens_BxT.shape[1]) + 1, 0), axis=1)
    return index_B, hit_BxT.any(axis=1)


def normalize(x_BxE):
    x_BxE = x_BxE.astype(jnp.float32)
    return x_BxE / jnp.sqrt(jnp.sum(x_BxE**2, axis=-1, keepdims=True) + 1e-12)


def info_nce(text_BxE, image_BxE, valid_B, logit_scale):
    """Symmetric InfoNCE over the batch rows ``valid_B`` marks (each row's text and image a pair, the
    other valid rows its negatives): ``(loss, text->image accuracy)``, both means over the valid rows.
    Cosine similarities times ``logit_scale``; no valid row: 0, 0."""
    logits_BxB = logit_scale * normalize(text_BxE) @ normalize(image_BxE).T
    pair_BxB = valid_B[:, None] & valid_B[None, :]
    logits_BxB = jnp.where(pair_BxB, logits_BxB, NEG)
    diag_B = jnp.diagonal(logits_BxB)
    t2i_B = jax.nn.logsumexp(logits_BxB, axis=1) - diag_B
    i2t_B = jax.nn.logsumexp(logits_BxB, axis=0) - diag_B
    weight_B = valid_B.astype(jnp.float32)
    n = jnp.maximum(weight_B.sum(), 1.0)
    loss = jnp.sum(weight_B * 0.5 * (t2i_B + i2t_B)) / n
    hit_B = jnp.argmax(logits_BxB, axis=1) == jnp.arange(logits_BxB.shape[0])
    return loss, jnp.sum(weight_B * hit_B) / n


class RetrievalHead(Part):
    """The ``retrieval`` collection: the two linear maps into the shared space and the logit scale."""

    config: RetrievalConfig

    def setup(self):
        c = self.config
        self.text_proj = Dense(c.dim, ("embed", None), dtype=self.dtype)
        self.image_proj = Dense(c.dim, (None, None), dtype=self.dtype)
        init = nn.initializers.constant(math.log(1.0 / c.temperature))
        self.log_scale = self.param("logit_scale", nn.with_logical_partitioning(init, ()), ())

    def logit_scale(self):
        return jnp.minimum(jnp.exp(self.log_scale), MAX_LOGIT_SCALE)

    def __call__(self, hidden_BxD, pooled_BxE):
        return self.text_proj(hidden_BxD), self.image_proj(pooled_BxE)


class RetrievalLlava(Llava):
    """LLaVA with FROMAGe's retrieval head (module docstring)."""

    config: RetrievalLlavaConfig

    def setup(self):
        super().setup()
        self.retrieval = RetrievalHead(self.config.retrieval, self.dtype)

    def __call__(self, tokens_BxT, images_BxIxYxXxC=None, *args, **kwargs):
        if self.is_initializing():  # init through __call__ must create the head's params too
            width = self.config.vision.hidden_size
            self.retrieval(jnp.zeros((1, self.config.llm.hidden_size)), jnp.zeros((1, width)))
        return super().__call__(tokens_BxT, images_BxIxYxXxC, *args, **kwargs)

    def _features(self, images_BxIxYxXxC):
        """``(features [B, MP, D_llm] for the <image> tokens, pooled [B, I, E])``: one tower pass."""
        c = self.config
        hidden_states, pooled_BIxE = self.vision(per_image(images_BxIxYxXxC))
        feats = select_features(
            hidden_states, c.vision_feature_layers, c.vision_feature_select_strategy == "default"
        )
        b = images_BxIxYxXxC.shape[0]
        return self.media_blocks(self.adapter(feats), b), pooled_BIxE.reshape(b, -1, pooled_BIxE.shape[-1])

    def _hidden_and_logits(self, embeds_BxTxD, positions_BxT, attention_mask_BxT):
        """The decoder's logits and its LM head's input (the last hidden states)."""
        kept = []

        def keep_head_input(next_fun, args, kwargs, context):
            if context.method_name == "head":
                kept.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(keep_head_input):
            logits_BxTxV, _ = self.decode(embeds_BxTxD, positions_BxT, attention_mask_BxT)
        return kept[0], logits_BxTxV

    def text_embeddings(self, tokens_BxT, attention_mask_BxT=None):
        """Text-only rows ending in ``[RET]`` -> their embeddings ``[B, E]`` (unnormalised)."""
        embeds = self.llm.embed(tokens_BxT)
        hidden_BxTxD, _ = self._hidden_and_logits(embeds, None, attention_mask_BxT)
        index_B, _ = last_token_index(tokens_BxT, self.config.retrieval.token_id)
        ret_BxD = jnp.take_along_axis(hidden_BxTxD, index_B[:, None, None], axis=1)[:, 0]
        return self.retrieval.text_proj(ret_BxD)

    def image_embeddings(self, images_BxIxYxXxC):
        """Each row's first image -> its embedding ``[B, E]`` (unnormalised)."""
        _, pooled_BxIxE = self._features(images_BxIxYxXxC)
        return self.retrieval.image_proj(pooled_BxIxE[:, 0])

    def train_outputs(self, tokens_BxT, images_BxIxYxXxC, positions_BxT=None, attention_mask_BxT=None):
        """``(logits_BxTxV, {name: (batch mean, weight in the loss)})`` in one forward pass: the LM's
        logits, and InfoNCE between the rows that hold ``[RET]`` and their first images (a row's
        ``[RET]`` must not see its image: data/synthetic.py ``retrieval_record`` puts it after)."""
        c = self.config
        if positions_BxT is not None:  # packed rows (data.packing): one row would hold several pairs
            raise ValueError(
                "the [RET] retrieval loss pairs a row's [RET] with its first image: no data.packing"
            )
        features, pooled_BxIxE = self._features(images_BxIxYxXxC)
        embeds = splice_images(self.llm.embed(tokens_BxT), tokens_BxT, c.image_token_id, features)
        hidden_BxTxD, logits_BxTxV = self._hidden_and_logits(embeds, positions_BxT, attention_mask_BxT)
        index_B, valid_B = last_token_index(tokens_BxT, c.retrieval.token_id)
        ret_BxD = jnp.take_along_axis(hidden_BxTxD, index_B[:, None, None], axis=1)[:, 0]
        text_BxE, image_BxE = self.retrieval(ret_BxD, pooled_BxIxE[:, 0])
        loss, accuracy = info_nce(text_BxE, image_BxE, valid_B, self.retrieval.logit_scale())
        return logits_BxTxV, {"ret": (loss, c.retrieval.weight), "ret/accuracy": (accuracy, 0.0)}

"""BLIP-2 and InstructBLIP: EVA ViT -> Q-Former adapter (learned queries + linear projection) -> LLM.

Each image becomes ``num_query_tokens`` LLM input vectors. As in transformers 5 (``Blip2Processor``
puts ``num_query_tokens`` ``<image>`` tokens before BOS and the model ``masked_scatter``s the projected
queries into them), the query outputs replace the ``<image>`` token embeddings in order, so the same
splice as LLaVA's serves both. InstructBLIP differs only in the Q-Former also reading the instruction
(``qformer_tokens``). Params: ``vision``, ``adapter`` (``query_tokens``, ``qformer``,
``language_projection``, and with ``itc_embed_dim`` the stage-1 heads of ``mllm_jax.models.blip2_stage1``),
``llm`` (an OPT or LLaMA-family decoder).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mllm_jax.models.eva import EvaConfig, EvaTower
from mllm_jax.models.layers import ScanStack
from mllm_jax.models.llm import Llm, LlmConfig
from mllm_jax.models.mllm import MultimodalLM, check_video, per_image
from mllm_jax.models.opt import Opt, OptConfig
from mllm_jax.models.qformer import QFormerAdapter, QFormerConfig

# llm_type -> (config class, module class): the decoders a BLIP-2 model can drive.
LLMS = {"opt": (OptConfig, Opt), "llm": (LlmConfig, Llm)}


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    vision: EvaConfig = EvaConfig()
    qformer: QFormerConfig = QFormerConfig()
    llm: LlmConfig | OptConfig = OptConfig()
    num_query_tokens: int = 32
    image_token_id: int = 255
    # Which decoder ``llm`` is ("opt" | "llm"); inferred from ``llm`` when empty. Stored so that a
    # config serialised with dataclasses.asdict can rebuild ``llm`` from its dict.
    llm_type: str = ""
    # BLIP-2 stage 1 (``mllm_jax.models.blip2_stage1``): width of the ITC embeddings (HF
    # ``image_text_hidden_size``); 0 = no stage-1 heads. Needs a Q-Former with ``text_ffn``.
    itc_embed_dim: int = 0
    # ITG's [DEC] token: replaces the caption's first token (BLIP-2 uses the tokenizer's bos id; our
    # word-level tokenizers prepend <s> = 1 already, so there it changes nothing).
    dec_token_id: int = 1
    # Video, as LlavaConfig: "mean" averages a clip's projected query outputs over its frames.
    frames_per_clip: int = 1
    video_pool: str = "concat"

    def __post_init__(self):
        llm = self.llm
        if isinstance(llm, dict):  # from config_from_dict: the union-typed field arrives as a dict
            if self.llm_type not in LLMS:
                raise ValueError(
                    f"llm_type must be one of {sorted(LLMS)} to rebuild llm, got {self.llm_type!r}"
                )
            llm = LLMS[self.llm_type][0](**llm)
            object.__setattr__(self, "llm", llm)
        inferred = next((name for name, (cls, _) in LLMS.items() if isinstance(llm, cls)), None)
        if inferred is None:
            raise ValueError(f"llm must be an OptConfig or LlmConfig, got {type(llm).__name__}")
        if self.llm_type and self.llm_type != inferred:
            raise ValueError(f"llm_type {self.llm_type!r} does not match llm {type(llm).__name__}")
        object.__setattr__(self, "llm_type", inferred)

    @property
    def tokens_per_image(self) -> int:
        return self.num_query_tokens

    @property
    def frames_per_media(self) -> int:
        """Images (frames) per block of query tokens in the sequence."""
        return self.frames_per_clip if self.video_pool == "mean" else 1

    @property
    def instruct(self) -> bool:
        """InstructBLIP: the Q-Former reads the instruction tokens too."""
        return self.qformer.text_input

    def validate(self):
        check_video(self)
        self.vision.validate()
        self.qformer.validate()
        self.llm.validate()
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"Q-Former encoder_hidden_size {self.qformer.encoder_hidden_size} != vision hidden_size "
                f"{self.vision.hidden_size}"
            )
        if isinstance(self.llm, OptConfig) and self.llm.projects:
            # HF projects the queries to hidden_size but splices them into word_embed_proj_dim
            # embeddings; such a model cannot run there, so we refuse it here as well.
            raise ValueError(
                f"BLIP-2 needs an OPT whose word_embed_proj_dim ({self.llm.embed_dim}) equals hidden_size "
                f"({self.llm.hidden_size})"
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
        if self.itc_embed_dim < 0:
            raise ValueError(f"itc_embed_dim must be >= 0, got {self.itc_embed_dim}")
        if self.itc_embed_dim and (self.qformer.text_input or not self.qformer.text_ffn):
            raise ValueError(
                "BLIP-2 stage-1 heads (itc_embed_dim > 0) need qformer.text_ffn=True and "
                "qformer.text_input=False"
            )
        if self.itc_embed_dim and not 0 <= self.dec_token_id < self.qformer.vocab_size:
            raise ValueError(
                f"dec_token_id {self.dec_token_id} is outside the Q-Former vocabulary "
                f"({self.qformer.vocab_size})"
            )


class Blip2(MultimodalLM, ScanStack):
    """BLIP-2 / InstructBLIP; ``remat`` applies to the vision, Q-Former and LLM layers, ``scan_layers``
    to the vision and LLM layers."""

    config: Blip2Config

    def setup(self):
        c = self.config
        self.vision = EvaTower(c.vision, self.dtype, self.remat, self.scan_layers, self.attention)
        self.adapter = QFormerAdapter(
            c.qformer,
            c.num_query_tokens,
            c.llm.hidden_size,
            self.dtype,
            self.remat,
            c.itc_embed_dim,
            self.attention,
        )
        self.llm = LLMS[c.llm_type][1](c.llm, self.dtype, self.remat, self.scan_layers, self.attention)

    def image_features(self, images_BxIxYxXxC, qformer_tokens_BxT=None, qformer_mask_BxT=None):
        """``[B, I, Y, X, C]`` -> projected query outputs ``[B, MQ, D_llm]``, M = I, or the number of
        clips when ``video_pool`` is "mean". ``embed`` and ``__call__`` take the same keywords.

        ``qformer_tokens_BxT`` (InstructBLIP): the instruction in the Q-Former's vocabulary (its own
        length T, not the LLM sequence's), shared by all I images of a sample, or ``[B, I, T]``, one per
        image (packed rows: each image's own sample's); ``qformer_mask_BxT`` marks its valid tokens.
        """
        b, i = images_BxIxYxXxC.shape[:2]
        _, image_BIxPxE = self.vision(per_image(images_BxIxYxXxC))
        if qformer_tokens_BxT is not None and qformer_tokens_BxT.ndim == 3:  # [B, I, T]: one per image
            qformer_tokens_BxT = qformer_tokens_BxT.reshape(b * i, -1)  # (packed rows: its sample's)
            if qformer_mask_BxT is not None:
                qformer_mask_BxT = qformer_mask_BxT.reshape(b * i, -1)
        elif qformer_tokens_BxT is not None and i > 1:
            qformer_tokens_BxT = jnp.repeat(qformer_tokens_BxT, i, axis=0)
            if qformer_mask_BxT is not None:
                qformer_mask_BxT = jnp.repeat(qformer_mask_BxT, i, axis=0)
        queries = self.adapter(image_BIxPxE, qformer_tokens_BxT, qformer_mask_BxT)
        return self.media_blocks(queries, images_BxIxYxXxC.shape[0])

"""Pure Flax (linen) modules: layers, vision towers, decoders, adapters and the composite models.

Shape suffixes. An array's name ends in its shape, one letter per axis joined by ``x`` (``q_BxTxNxH``
is ``[B, T, N, H]``); docstrings write shapes with the same letters. A letter means one thing in every
module here:

    B  batch
    T  tokens of the sequence a module runs over: its queries (each sequence its own T: BLIP-2's
       ``qformer_tokens_BxT`` are the Q-Former's instruction, not the LLM's ``tokens_BxT``)
    S  keys/values a query attends over (a KV-cache buffer, a cross-attention's media, the
       Q-Former's ``[queries; text]``, which attends over itself)
    D  the module's own width
    E  a width from elsewhere: features read from another module (vision, media, OPT's narrower word
       embeddings) or a projection's output (the ITC space)
    N  attention (query) heads
    K  key/value heads (N % K == 0)
    H  head dim
    V  vocabulary
    L  layers (stacked by ``nn.scan``)
    I  images (frames) per sample; in retrieval, the images scored
    J  captions scored against them (retrieval)
    M  media items per sample: the images, or clips when a clip's frames become one item
    F  frames per clip
    P  tokens per image: a vision tower's patches (and class token), or a resampler's latents
    Q  learned queries: the Q-Former's query tokens, the perceiver's latents
    Y, X  image height and width in pixels
    C  colour channels

Digits are literal sizes (``Bx1xD``). Letters written together multiply: ``MP`` is M·P rows, ``3B`` three
batches stacked, ``3D`` a fused q/k/v width, ``BI`` batch and images flattened into one axis.
"""

"""Word-level fast tokenizer for closed-vocabulary data (the built-in synthetic dataset, tests).

It is a genuine HF ``PreTrainedTokenizerFast``, so checkpoints exported with it load in transformers
(``AutoTokenizer.from_pretrained``) exactly like a downloaded model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIALS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order
IMAGE_TOKEN = "<image>"


def build_tokenizer(words: Iterable[str], extra_special: tuple = (IMAGE_TOKEN,)) -> PreTrainedTokenizerFast:
    """A whitespace-split, word-level tokenizer that prepends ``<s>``.

    Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, then ``words`` in the given order (duplicates
    and specials dropped), then ``extra_special`` (so by default ``<image>`` is the last id). Text must
    be space-separated words (``"what color is the circle ?"``); unknown words map to ``<unk>``.
    """
    vocab: dict[str, int] = {}
    for w in (*SPECIALS, *words):
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"vocabulary entries must be non-empty and contain no whitespace: {w!r}")
        if w not in extra_special:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # cleanup=False: decode is then the exact inverse of encode ("color ?" must not become "color?").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return fast

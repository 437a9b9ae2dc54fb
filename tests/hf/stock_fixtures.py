"""Tiny stand-ins of stock repos whose files differ from what ``save_pretrained`` writes (issue 19).

``google/siglip-so400m-patch14-384`` keeps its tokenizer as a SentencePiece ``spiece.model`` with
``tokenizer_config.json`` and ``special_tokens_map.json`` (no ``tokenizer.json``), and its image
processor as a ``SiglipImageProcessor`` ``preprocessor_config.json`` naming ``SiglipProcessor``.
"""

from __future__ import annotations

import json
import os

import hf_fixtures as F

SIGLIP_SPECIALS = ("<pad>", "</s>", "<unk>")  # the T5-style ids SiglipTokenizer expects: 0, 1, 2


def spiece_model(words) -> bytes:
    """A unigram SentencePiece model over ``words`` (serialized ``ModelProto``), built with the protobuf
    schema transformers ships, so no sentencepiece trainer is needed."""
    from transformers.utils import sentencepiece_model_pb2_new as sp

    m = sp.ModelProto()
    for i, piece in enumerate(SIGLIP_SPECIALS):
        m.pieces.add(piece=piece, score=0.0, type=[3, 3, 2][i])  # CONTROL, CONTROL, UNKNOWN
    m.pieces.add(piece="\u2581", score=-1.0)
    for w in words:
        m.pieces.add(piece="\u2581" + w, score=-2.0)
    m.trainer_spec.model_type = 1  # UNIGRAM
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.unk_id, m.trainer_spec.bos_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    return m.SerializeToString()


def build_siglip_stock(path: str, seed: int = 0) -> str:
    """A ``SiglipModel`` directory as google/siglip-* keep it: model.safetensors, config.json (text and
    vision halves, vocabulary = the spiece.model's pieces), spiece.model, tokenizer_config.json,
    special_tokens_map.json and preprocessor_config.json; no tokenizer.json."""
    F.build_dual(path, "siglip", seed=seed)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for name in os.listdir(path):  # the fast word-level tokenizer build_dual saved
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "preprocessor", "processor")):
            os.remove(os.path.join(path, name))
    proto = spiece_model(F.WORDS)
    with open(os.path.join(path, "spiece.model"), "wb") as f:
        f.write(proto)
    vocab = len(SIGLIP_SPECIALS) + 1 + len(F.WORDS)
    assert config["text_config"]["vocab_size"] == vocab, (config["text_config"]["vocab_size"], vocab)
    specials = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "SiglipTokenizer",
            "model_max_length": 64,
            "do_lower_case": True,
            "additional_special_tokens": [],
            **specials,
        },
        "special_tokens_map.json": specials,
        "preprocessor_config.json": {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": F.VISION["siglip"]["image_size"], "width": F.VISION["siglip"]["image_size"]},
        },
    }
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)
    return path

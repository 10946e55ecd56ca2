"""Build small SigLIP checkpoints from scratch.

A checkpoint written here has the same layout as a SigLIP checkpoint on the
Hugging Face hub (``config.json`` + weights, a SentencePiece ``spiece.model``
with its tokenizer config, and ``preprocessor_config.json``), so it loads
through exactly the same ``from_pretrained`` calls as a real model.  It is used
for tests, as an offline fallback when no pretrained model can be reached, and
as the starting point for training a model on a local corpus.

This module does not import Django.
"""

from __future__ import annotations

import copy
import io
import re
import string
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipTokenizer,
)
from transformers.image_utils import PILImageResampling

from embeddings.core.siglip import TEXT_MAX_LENGTH

__all__ = [
    "DEFAULT_TINY_IMAGE_SIZE",
    "build_random_checkpoint",
    "canonicalize_text",
    "save_checkpoint",
    "tiny_siglip_config",
    "train_sentencepiece_tokenizer",
]

# SigLIP's SentencePiece vocabulary starts with these three pieces; the
# tokenizer pads with the end-of-sequence token, like the released models.
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

DEFAULT_TINY_IMAGE_SIZE = 32

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def canonicalize_text(text: str) -> str:
    """Normalise text the way ``SiglipTokenizer`` does before SentencePiece.

    Lower-cases, drops ASCII punctuation and collapses whitespace, so that the
    vocabulary is trained on the same strings the tokenizer will later see.
    """
    text = text.lower().translate(_PUNCTUATION_TABLE)
    return _WHITESPACE.sub(" ", text).strip()


def train_sentencepiece_tokenizer(
    texts: Iterable[str], out_dir, vocab_size: int = 1000
) -> SiglipTokenizer:
    """Train a unigram SentencePiece vocabulary on ``texts`` and save it as a
    ``SiglipTokenizer`` in ``out_dir``.

    ``vocab_size`` is an upper bound: small corpora cannot fill a large
    vocabulary, so the trainer is allowed to stop earlier
    (``hard_vocab_limit=False``).  Use ``len(tokenizer)`` for the actual size.
    """
    sentences = [canonicalize_text(t) for t in texts if isinstance(t, str)]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("cannot train a tokenizer: no non-empty text was given")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_bytes,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        pad_piece=PAD_PIECE,
        eos_id=EOS_ID,
        eos_piece=EOS_PIECE,
        unk_id=UNK_ID,
        unk_piece=UNK_PIECE,
        bos_id=-1,
        # SiglipTokenizer encodes "<unk>" + text and then drops the pieces of
        # "<unk>"; keeping "<" and ">" as pieces makes that split exact.
        required_chars="<>",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    vocab_file = out_dir / "spiece.model"
    vocab_file.write_bytes(model_bytes.getvalue())

    tokenizer = SiglipTokenizer(
        vocab_file=str(vocab_file),
        eos_token=EOS_PIECE,
        unk_token=UNK_PIECE,
        pad_token=EOS_PIECE,
        model_max_length=TEXT_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


_SHARED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_VISION_KEYS = ("image_size", "patch_size", "num_channels", "vision_use_head")
_TEXT_KEYS = ("max_position_embeddings", "projection_size")


def tiny_siglip_config(vocab_size: int, **overrides) -> SiglipConfig:
    """A very small SigLIP configuration (both towers 32 wide, 2 layers).

    ``overrides`` may hold:

    * ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
      ``num_attention_heads``: applied to both towers;
    * ``image_size``, ``patch_size``, ``num_channels``, ``vision_use_head``:
      applied to the vision tower;
    * ``max_position_embeddings``, ``projection_size``: applied to the text
      tower;
    * ``text_config`` / ``vision_config``: dicts merged into that tower last;
    * anything else is passed to ``SiglipConfig`` itself.

    The text projection defaults to the vision width so that the two pooled
    outputs share one embedding space, as in the released models.
    """
    overrides = dict(overrides)
    text = {
        "vocab_size": int(vocab_size),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_MAX_LENGTH,
        "pad_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": None,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": DEFAULT_TINY_IMAGE_SIZE,
        "patch_size": 8,
    }
    for key in _SHARED_KEYS:
        if key in overrides:
            text[key] = vision[key] = overrides.pop(key)
    for key in _VISION_KEYS:
        if key in overrides:
            vision[key] = overrides.pop(key)
    for key in _TEXT_KEYS:
        if key in overrides:
            text[key] = overrides.pop(key)
    text.update(overrides.pop("text_config", None) or {})
    vision.update(overrides.pop("vision_config", None) or {})
    text.setdefault("projection_size", vision["hidden_size"])

    if vision["image_size"] % vision["patch_size"]:
        raise ValueError(
            f"image_size {vision['image_size']} is not a multiple of patch_size {vision['patch_size']}"
        )
    if text["projection_size"] != vision["hidden_size"]:
        raise ValueError(
            "the text projection_size must equal the vision hidden_size "
            f"({text['projection_size']} != {vision['hidden_size']})"
        )
    return SiglipConfig(text_config=text, vision_config=vision, **overrides)


def _image_processor(image_size: int) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": int(image_size), "width": int(image_size)},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def save_checkpoint(model, tokenizer, out_dir, image_size: int | None = None) -> Path:
    """Save ``model``, ``tokenizer`` and a SigLIP preprocessing config (square
    ``image_size``, mean/std 0.5, bicubic) to ``out_dir``; returns the path.

    ``image_size`` defaults to the model's ``vision_config.image_size``; a
    different value is rejected because SigLIP's position embeddings are tied
    to the training resolution.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_size = model.config.vision_config.image_size
    if image_size is None:
        image_size = model_size
    if int(image_size) != int(model_size):
        raise ValueError(
            f"image_size {image_size} does not match the model's vision image_size {model_size}"
        )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _image_processor(image_size).save_pretrained(str(out_dir))
    return out_dir


def build_random_checkpoint(
    out_dir,
    texts: Iterable[str],
    *,
    seed: int = 0,
    config: SiglipConfig | None = None,
    image_size: int | None = None,
) -> Path:
    """Write a SigLIP checkpoint with random weights to ``out_dir``.

    The tokenizer is trained on ``texts``; the model uses ``config`` (default:
    :func:`tiny_siglip_config`) with its text vocabulary set to the
    tokenizer's size.  ``image_size`` overrides the vision resolution.  The
    result is deterministic for a given ``seed``, ``texts`` and ``config``, and
    the global torch random state is left untouched.
    """
    out_dir = Path(out_dir)
    tokenizer = train_sentencepiece_tokenizer(texts, out_dir)
    vocab_size = len(tokenizer)

    if config is None:
        extra = {"image_size": image_size} if image_size is not None else {}
        config = tiny_siglip_config(vocab_size, **extra)
    else:
        config = copy.deepcopy(config)
        config.text_config.vocab_size = vocab_size
        config.text_config.pad_token_id = tokenizer.pad_token_id
        config.text_config.eos_token_id = tokenizer.eos_token_id
        if image_size is not None:
            config.vision_config.image_size = int(image_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    model.eval()
    return save_checkpoint(model, tokenizer, out_dir, config.vision_config.image_size)

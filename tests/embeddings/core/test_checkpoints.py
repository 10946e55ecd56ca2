"""Tests for building small SigLIP checkpoints (embeddings.core.checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    SiglipModel,
    SiglipTokenizer,
)

from embeddings.core.checkpoints import (
    build_random_checkpoint,
    canonicalize_text,
    save_checkpoint,
    tiny_siglip_config,
    train_sentencepiece_tokenizer,
)
from tests.helpers import ENCODER_CAPTIONS

CAPTIONS = ENCODER_CAPTIONS[:5]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-siglip"), CAPTIONS, seed=0)


def test_checkpoint_has_the_hub_layout(checkpoint_dir):
    names = {path.name for path in checkpoint_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "spiece.model",
        "tokenizer_config.json",
        "preprocessor_config.json",
    } <= names


def test_checkpoint_reloads_with_auto_classes(checkpoint_dir):
    config = AutoConfig.from_pretrained(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    processor = AutoImageProcessor.from_pretrained(checkpoint_dir)
    model = SiglipModel.from_pretrained(checkpoint_dir)

    assert config.model_type == "siglip"
    assert isinstance(tokenizer, SiglipTokenizer)
    assert config.text_config.vocab_size == len(tokenizer)
    assert (processor.size.height, processor.size.width) == (32, 32)
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    assert model.config.vision_config.image_size == 32


def test_preprocessor_config_names_the_siglip_processor(checkpoint_dir):
    data = json.loads((checkpoint_dir / "preprocessor_config.json").read_text())
    assert data["image_processor_type"] == "SiglipImageProcessor"
    assert data["size"] == {"height": 32, "width": 32}


def test_build_is_deterministic_for_a_seed(tmp_path):
    first = build_random_checkpoint(tmp_path / "a", CAPTIONS, seed=7)
    second = build_random_checkpoint(tmp_path / "b", CAPTIONS, seed=7)
    other = build_random_checkpoint(tmp_path / "c", CAPTIONS, seed=8)
    for name in ("model.safetensors", "spiece.model", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_build_leaves_the_global_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random_checkpoint(tmp_path, CAPTIONS, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_build_accepts_a_config_and_an_image_size(tmp_path):
    config = tiny_siglip_config(5, hidden_size=48, num_attention_heads=4)
    path = build_random_checkpoint(tmp_path, CAPTIONS, config=config, image_size=64)
    saved = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert saved.text_config.vocab_size == len(tokenizer)  # follows the tokenizer
    assert saved.vision_config.hidden_size == saved.text_config.hidden_size == 48
    assert saved.vision_config.image_size == 64
    assert AutoImageProcessor.from_pretrained(path).size.height == 64
    assert config.text_config.vocab_size == 5  # the caller's config is not modified


def test_tokenizer_vocabulary_shrinks_for_a_tiny_corpus(tmp_path):
    tokenizer = train_sentencepiece_tokenizer(["a cat", "a dog"], tmp_path, vocab_size=1000)
    assert 3 < len(tokenizer) < 1000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.unk_token == "<unk>"


def test_tokenizer_respects_the_requested_vocabulary_size(tmp_path):
    corpus = [f"caption number {i} shows {word}" for i, word in enumerate(CAPTIONS * 20)]
    tokenizer = train_sentencepiece_tokenizer(corpus, tmp_path, vocab_size=60)
    assert len(tokenizer) <= 60


def test_saved_tokenizer_encodes_like_the_trained_one(tmp_path):
    tokenizer = train_sentencepiece_tokenizer(CAPTIONS, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a red car on the beach", "two fresh dogs"]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]


def test_tokenizer_ends_texts_with_eos_and_decodes_them(tmp_path):
    tokenizer = train_sentencepiece_tokenizer(CAPTIONS, tmp_path)
    ids = tokenizer("A red CAR, on the beach!")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red car on the beach"


def test_tokenizer_needs_some_text(tmp_path):
    with pytest.raises(ValueError):
        train_sentencepiece_tokenizer(["", "  ", "!!"], tmp_path)


def test_canonicalize_text_matches_the_siglip_tokenizer(tmp_path):
    tokenizer = train_sentencepiece_tokenizer(CAPTIONS, tmp_path)
    for text in ["A Red  CAR!", "  snowy, mountains... at 'sunset' ", "tabs\tand\nnewlines"]:
        assert canonicalize_text(text) == tokenizer.canonicalize_text(text)


def test_tiny_config_is_small_and_consistent():
    config = tiny_siglip_config(50)
    assert config.text_config.vocab_size == 50
    assert config.text_config.max_position_embeddings == 64
    assert config.text_config.projection_size == config.vision_config.hidden_size
    assert config.vision_config.image_size % config.vision_config.patch_size == 0
    model = SiglipModel(config)
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_tiny_config_overrides():
    config = tiny_siglip_config(
        50,
        hidden_size=64,
        num_hidden_layers=3,
        image_size=48,
        patch_size=16,
        text_config={"intermediate_size": 100},
    )
    assert config.text_config.hidden_size == config.vision_config.hidden_size == 64
    assert config.text_config.num_hidden_layers == config.vision_config.num_hidden_layers == 3
    assert config.text_config.intermediate_size == 100
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (48, 16)
    with pytest.raises(ValueError):
        tiny_siglip_config(50, image_size=30, patch_size=8)


def test_save_checkpoint_rejects_a_mismatched_image_size(tmp_path):
    tokenizer = train_sentencepiece_tokenizer(CAPTIONS, tmp_path / "tok")
    model = SiglipModel(tiny_siglip_config(len(tokenizer)))
    with pytest.raises(ValueError):
        save_checkpoint(model, tokenizer, tmp_path / "out", image_size=224)
    path = save_checkpoint(model, tokenizer, tmp_path / "out", image_size=32)
    assert (path / "preprocessor_config.json").exists()

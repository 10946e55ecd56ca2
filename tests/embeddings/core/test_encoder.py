"""Tests for the SigLIP encoder (embeddings.core.siglip).

Everything runs offline against a tiny random SigLIP checkpoint written by
``embeddings.core.checkpoints.build_random_checkpoint`` into a temporary directory;
it is loaded through the same ``from_pretrained`` path a hub id takes.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, SiglipImageProcessorPil, SiglipModel

from embeddings.core import siglip
from embeddings.core.checkpoints import build_random_checkpoint, tiny_siglip_config
from embeddings.core.siglip import (
    DEFAULT_MODEL,
    TEXT_MAX_LENGTH,
    ImagePreprocessor,
    ModelNotAvailable,
    SiglipEncoder,
    get_encoder,
    load_image,
)
from tests.helpers import ENCODER_CAPTIONS, jpeg_bytes, two_colour_image

CAPTIONS = ENCODER_CAPTIONS

# transformers' SigLIP PIL image processor and ImagePreprocessor perform the
# same Pillow resize followed by the same float64 rescale and float32
# normalisation, so their outputs are identical; the tolerance only leaves
# room for float32 rounding should the order of operations ever change.
PREPROCESS_ATOL = 1e-6


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-siglip"), CAPTIONS, seed=0)


@pytest.fixture(scope="module")
def encoder(checkpoint_dir):
    return SiglipEncoder(str(checkpoint_dir), device="cpu").load()


@pytest.fixture(scope="module")
def reference_processor(checkpoint_dir):
    return SiglipImageProcessorPil.from_pretrained(str(checkpoint_dir))


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def image_with_alpha(width, height, mode, seed=1):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[: height // 3, :, 3] = 0  # a fully transparent band
    image = Image.fromarray(rgba, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def palette_with_transparency(width, height):
    image = random_image(width, height).quantize(colors=16)
    image.info["transparency"] = 3
    return image


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()




def unit_rows(vectors):
    vectors = torch.as_tensor(vectors).float()
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def test_tiny_checkpoint_loads_through_the_encoder(encoder, checkpoint_dir):
    assert encoder.is_loaded
    assert isinstance(encoder.model, SiglipModel)
    assert encoder.source == str(checkpoint_dir)
    assert encoder.device == "cpu"
    assert encoder.model.dtype == torch.float32
    assert not encoder.model.training
    assert encoder.dim == encoder.model.config.vision_config.hidden_size == 32
    assert encoder.image_size == encoder.model.config.vision_config.image_size == 32


def test_encoder_loads_nothing_until_asked(checkpoint_dir):
    encoder = SiglipEncoder(str(checkpoint_dir), device="cpu")
    assert not encoder.is_loaded
    assert encoder.dim is None and encoder.image_size is None
    assert encoder.load() is encoder
    assert encoder.is_loaded


def test_concurrent_loads_load_the_model_once(checkpoint_dir, monkeypatch):
    calls = []
    original = SiglipModel.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        calls.append(args)
        time.sleep(0.05)  # widen the window for a race
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SiglipModel, "from_pretrained", classmethod(counting_from_pretrained))
    encoder = SiglipEncoder(str(checkpoint_dir), device="cpu")
    threads = [threading.Thread(target=encoder.load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model = encoder.model
    encoder.load()
    assert len(calls) == 1
    assert encoder.model is model


def test_device_defaults_to_cpu_without_cuda(checkpoint_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert SiglipEncoder(str(checkpoint_dir)).device == "cpu"


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


def test_text_vectors_are_unit_length(encoder):
    vectors = encoder.encode_texts(CAPTIONS[:3])
    assert vectors.shape == (3, encoder.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_batching_matches_one_by_one(encoder):
    batched = encoder.encode_texts(CAPTIONS, batch_size=3)
    one_by_one = np.concatenate([encoder.encode_texts([text]) for text in CAPTIONS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_different_texts_give_different_vectors(encoder):
    vectors = encoder.encode_texts(["a red car", "a sleeping cat"])
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)


def test_texts_are_padded_and_truncated_to_64_tokens(encoder):
    long_text = " ".join(["mountains under a blue sky"] * 40)
    input_ids = encoder.tokenize(["a dog", long_text])["input_ids"]
    assert TEXT_MAX_LENGTH == 64
    assert tuple(input_ids.shape) == (2, 64)
    pad_id = encoder.tokenizer.pad_token_id
    assert pad_id == encoder.tokenizer.eos_token_id  # SigLIP pads with </s>
    assert input_ids[0, -1].item() == pad_id
    assert (input_ids[1] != pad_id).sum().item() >= 60


def test_tokenisation_passes_no_attention_mask(encoder):
    # SigLIP was trained attending over the padding; masking it would change
    # the pooled last position.
    assert set(encoder.tokenize(["a dog"])) == {"input_ids"}


def test_encode_texts_equals_direct_model_call_with_max_length_padding(encoder):
    texts = ["a brown dog on the beach", "fresh fruit"]
    inputs = encoder.tokenizer(
        texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    assert inputs["input_ids"].shape == (2, 64)
    with torch.no_grad():
        direct = encoder.model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
    np.testing.assert_allclose(encoder.encode_texts(texts), unit_rows(direct), atol=1e-5)

    # Padding only to the longest text pools a different position: it is not
    # what the encoder does.
    short = encoder.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        unpadded = encoder.model.get_text_features(input_ids=short["input_ids"]).pooler_output
    assert not np.allclose(encoder.encode_texts(texts), unit_rows(unpadded), atol=1e-3)


def test_a_single_string_is_rejected(encoder):
    with pytest.raises(TypeError):
        encoder.encode_texts("a red car")


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


def test_image_vectors_are_unit_length(encoder):
    images = [random_image(40, 30, seed=i) for i in range(3)]
    vectors = encoder.encode_images(images)
    assert vectors.shape == (3, encoder.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_image_batching_matches_one_by_one(encoder):
    images = [random_image(20 + 7 * i, 50 - 3 * i, seed=i) for i in range(5)]
    batched = encoder.encode_images(images, batch_size=2)
    one_by_one = np.concatenate([encoder.encode_images([image]) for image in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_encode_pixels_batching_matches_one_by_one(encoder):
    pixels = encoder.preprocess([random_image(33, 33, seed=i) for i in range(4)])
    batched = encoder.encode_pixels(pixels, batch_size=3)
    one_by_one = np.concatenate([encoder.encode_pixels(pixels[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_encode_images_accepts_bytes_paths_and_file_objects(encoder, tmp_path):
    image = random_image(48, 36, seed=5)
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = encoder.encode_images([image])
    for source in (data, path, str(path), io.BytesIO(data)):
        np.testing.assert_allclose(encoder.encode_images([source]), expected, atol=1e-6)


def test_encode_images_equals_direct_siglip_image_features(encoder):
    images = [random_image(64, 48, seed=11), random_image(25, 70, seed=12)]
    pixels = encoder.preprocess(images)
    with torch.no_grad():
        direct = encoder.model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    np.testing.assert_allclose(encoder.encode_images(images), unit_rows(direct), atol=1e-5)


def test_empty_inputs_give_empty_arrays(encoder):
    for vectors in (
        encoder.encode_texts([]),
        encoder.encode_images([]),
        encoder.encode_pixels(np.zeros((0, 3, 32, 32), dtype=np.float32)),
    ):
        assert vectors.shape == (0, encoder.dim)
        assert vectors.dtype == np.float32
    assert encoder.preprocess([]).shape == (0, 3, 32, 32)


def test_encode_pixels_rejects_wrong_shapes(encoder):
    with pytest.raises(ValueError):
        encoder.encode_pixels(np.zeros((3, 32, 32), dtype=np.float32))


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------

PREPROCESS_CASES = {
    "rgb-landscape": lambda: random_image(97, 53),
    "rgb-portrait": lambda: random_image(41, 130, seed=2),
    "rgb-already-target-size": lambda: random_image(32, 32, seed=3),
    "rgb-single-pixel": lambda: random_image(1, 1, seed=4),
    "rgba": lambda: image_with_alpha(60, 45, "RGBA"),
    "la": lambda: image_with_alpha(37, 81, "LA"),
    "l": lambda: random_image(70, 70, "L", seed=6),
    "p-with-transparency": lambda: palette_with_transparency(55, 31),
    "p-opaque": lambda: random_image(44, 66, seed=7).quantize(colors=32),
    "cmyk": lambda: random_image(50, 90, "CMYK", seed=8),
    "one-bit": lambda: random_image(29, 47, "1", seed=9),
}


@pytest.mark.parametrize("name", sorted(PREPROCESS_CASES))
def test_preprocess_matches_transformers_siglip_image_processor(encoder, reference_processor, name):
    image = PREPROCESS_CASES[name]()
    expected = reference_processor(image, return_tensors="np")["pixel_values"]
    actual = encoder.preprocess([image])
    assert actual.shape == expected.shape == (1, 3, 32, 32)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PREPROCESS_ATOL)


def test_preprocess_matches_transformers_for_a_mixed_batch(encoder, reference_processor):
    images = [factory() for factory in PREPROCESS_CASES.values()]
    expected = reference_processor(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(encoder.preprocess(images), expected, rtol=0, atol=PREPROCESS_ATOL)


def test_default_preprocessor_matches_siglip_base_settings():
    # The released base checkpoints: 224x224, bicubic, mean/std 0.5.
    images = [random_image(640, 480, seed=20), random_image(150, 400, seed=21), random_image(100, 100, "L")]
    expected = SiglipImageProcessorPil()(images, return_tensors="np")["pixel_values"]
    actual = ImagePreprocessor()(images)
    assert actual.shape == (3, 3, 224, 224)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PREPROCESS_ATOL)


def test_preprocessor_reads_the_checkpoint_config(encoder, checkpoint_dir):
    preprocessor = ImagePreprocessor.from_pretrained(str(checkpoint_dir))
    assert preprocessor == encoder.preprocessor
    assert (preprocessor.height, preprocessor.width) == (32, 32)
    assert preprocessor.resample == int(Image.Resampling.BICUBIC)
    assert preprocessor.image_mean == preprocessor.image_std == (0.5, 0.5, 0.5)


def test_preprocessor_is_picklable_for_worker_processes(encoder):
    import pickle

    clone = pickle.loads(pickle.dumps(encoder.preprocessor))
    images = [random_image(45, 20, seed=30)]
    np.testing.assert_array_equal(clone(images), encoder.preprocess(images))


# --------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------




@pytest.mark.parametrize("kind", ["bytes", "path", "file"])
def test_exif_orientation_is_applied(kind, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise
    data = jpeg_bytes(two_colour_image(40, 20), exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    source = {"bytes": data, "path": path, "file": io.BytesIO(data)}[kind]

    image = load_image(source)
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    top = np.asarray(image)[5, 10].astype(int)
    bottom = np.asarray(image)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_first_frame_of_an_animation_is_used():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    animated = Image.open(io.BytesIO(buffer.getvalue()))
    assert animated.n_frames == 3
    animated.seek(2)

    for source in (buffer.getvalue(), animated):
        image = load_image(source)
        assert image.mode == "RGB"
        assert image.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white(mode):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 5:, 3] = 255
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    decoded = load_image(png_bytes(image) if mode != "PA" else image)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.getpixel((8, 1)) != (255, 255, 255)


def test_palette_transparency_becomes_white():
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    decoded = load_image(png_bytes(image))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((4, 4)) == (10, 20, 30)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    for source in (image, png_bytes(image)):
        decoded = np.asarray(load_image(source))
        assert decoded.shape == (2, 2, 3)
        np.testing.assert_array_equal(decoded[..., 0], [[0, 64], [128, 255]])


def test_cmyk_jpeg_decodes_to_rgb():
    image = Image.new("CMYK", (12, 12), (0, 255, 255, 0))  # red in CMYK
    decoded = load_image(jpeg_bytes(image))
    assert decoded.mode == "RGB"
    red, green, blue = decoded.getpixel((6, 6))
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]],
    ids=["empty", "garbage", "truncated-png"],
)
def test_undecodable_input_raises_value_error(data):
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(data)


def test_undecodable_input_fails_encoding_with_value_error(encoder):
    with pytest.raises(ValueError):
        encoder.encode_images([b"not an image"])


# --------------------------------------------------------------------------
# Unavailable models
# --------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode plus a guard recording any attempt to open a socket."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network access is not allowed in tests")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def assert_helpful(error: ModelNotAvailable, source: str):
    message = str(error)
    assert "SIGLIP_MODEL" in message
    assert source in message
    assert "Traceback" not in message and "\n" not in message


def test_missing_local_directory_raises_model_not_available(tmp_path, offline):
    source = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(ModelNotAvailable) as info:
        SiglipEncoder(source, device="cpu").load()
    assert_helpful(info.value, source)
    assert offline == []


def test_unknown_hub_id_raises_model_not_available_offline(offline):
    source = "no-such-owner/no-such-siglip-checkpoint"
    started = time.monotonic()
    with pytest.raises(ModelNotAvailable) as info:
        SiglipEncoder(source, device="cpu").load()
    assert time.monotonic() - started < 10
    assert_helpful(info.value, source)
    assert offline == []


def test_directory_without_weights_raises_model_not_available(tmp_path, offline):
    tiny_siglip_config(100).save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailable) as info:
        SiglipEncoder(str(tmp_path), device="cpu").load()
    assert_helpful(info.value, str(tmp_path))


def test_non_siglip_checkpoint_raises_model_not_available(tmp_path, offline):
    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailable, match="not a SigLIP"):
        SiglipEncoder(str(tmp_path), device="cpu").load()


def test_preprocessing_size_must_match_the_model(tmp_path, offline, checkpoint_dir):
    import json
    import shutil

    target = tmp_path / "mismatched"
    shutil.copytree(checkpoint_dir, target)
    config_path = target / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["size"] = {"height": 64, "width": 64}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match="does not match"):
        SiglipEncoder(str(target), device="cpu").load()


def test_failed_load_can_be_retried(tmp_path, offline, checkpoint_dir):
    target = tmp_path / "later"
    encoder = SiglipEncoder(str(target), device="cpu")
    with pytest.raises(ModelNotAvailable):
        encoder.load()
    import shutil

    shutil.copytree(checkpoint_dir, target)
    assert encoder.load().is_loaded


def test_model_source_defaults_to_siglip_base(monkeypatch):
    monkeypatch.delenv("SIGLIP_MODEL", raising=False)
    assert siglip.model_source_from_env() == DEFAULT_MODEL == "google/siglip-base-patch16-224"
    monkeypatch.setenv("SIGLIP_MODEL", "/models/siglip")
    assert siglip.model_source_from_env() == "/models/siglip"


# --------------------------------------------------------------------------
# Process-wide cache
# --------------------------------------------------------------------------


def test_get_encoder_returns_the_same_object_for_the_same_source(checkpoint_dir, monkeypatch):
    monkeypatch.setattr(siglip, "_ENCODERS", {})
    first = get_encoder(str(checkpoint_dir), "cpu")
    assert get_encoder(str(checkpoint_dir), "cpu") is first
    assert get_encoder(str(checkpoint_dir), "meta") is not first
    assert not first.is_loaded  # the cache does not load eagerly
    first.load()
    assert get_encoder(str(checkpoint_dir), "cpu").is_loaded


def test_get_encoder_without_device_resolves_it(checkpoint_dir, monkeypatch):
    monkeypatch.setattr(siglip, "_ENCODERS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_encoder(str(checkpoint_dir)) is get_encoder(str(checkpoint_dir), "cpu")

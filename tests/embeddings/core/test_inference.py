"""Inference backends (embeddings.core.inference) on a small random SigLIP checkpoint.

Every faster path must keep fp32 quality: cosine >= 0.99 between its
embeddings and torch float32 on the same texts and images. The ONNX exports
are cached per checkpoint and made once even when several callers race.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from embeddings.core import inference, siglip
from embeddings.core.checkpoints import build_random_checkpoint, tiny_siglip_config
from embeddings.core.siglip import SiglipEncoder, get_encoder
from tests.helpers import ENCODER_CAPTIONS

CAPTIONS = ENCODER_CAPTIONS[:6]
QUERIES = CAPTIONS + ["A RED CAR!", "dogs", "a cat on a sofa next to a window " * 6]
MIN_COSINE = 0.99
FASTER = ("torch-int8", "onnx", "onnx-int8")


def photo(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(field, "RGB").resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Wider than the smallest test model, so the int8 paths quantise real matrices.
    config = tiny_siglip_config(200, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    return build_random_checkpoint(tmp_path_factory.mktemp("siglip-small"), CAPTIONS, seed=3, config=config)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return SiglipEncoder(str(checkpoint), device="cpu").load()


@pytest.fixture(scope="module")
def images():
    return [photo(i) for i in range(5)]


def encoder(checkpoint, backend, cache):
    return SiglipEncoder(str(checkpoint), device="cpu", backend=backend, onnx_cache_dir=cache).load()


# --------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------


def test_auto_is_onnx_int8_on_cpu_and_torch_on_cuda():
    assert inference.resolve_backend("auto", "cpu") == "onnx-int8"
    assert inference.resolve_backend(None, "cpu") == "onnx-int8"
    assert inference.resolve_backend("", "cpu") == "onnx-int8"
    assert inference.resolve_backend("auto", "cuda") == "torch"
    assert inference.resolve_backend("auto", "cuda:1") == "torch"
    assert inference.resolve_backend(" ONNX ", "cpu") == "onnx"


def test_cuda_graph_replay_is_for_text_towers_on_cuda_only(checkpoint, monkeypatch):
    model = SiglipEncoder(str(checkpoint), device="cpu").load().model
    assert not inference.TorchTower(model, "text", "cpu", torch.float32).cuda_graph
    assert not inference.TorchTower(model, "image", "cuda", torch.bfloat16).cuda_graph
    assert inference.TorchTower(model, "text", "cuda", torch.bfloat16).cuda_graph
    monkeypatch.setenv(inference.CUDA_GRAPHS_ENV_VAR, "0")
    assert not inference.cuda_graphs_enabled()
    assert not inference.TorchTower(model, "text", "cuda", torch.bfloat16).cuda_graph
    monkeypatch.setenv(inference.CUDA_GRAPHS_ENV_VAR, "on")
    assert inference.cuda_graphs_enabled()


def test_unknown_and_misplaced_backends_are_rejected():
    with pytest.raises(ValueError, match="unknown SigLIP inference backend"):
        inference.resolve_backend("tensorrt", "cpu")
    for backend in FASTER:
        with pytest.raises(ValueError, match="CPU only"):
            inference.resolve_backend(backend, "cuda")
    with pytest.raises(ValueError):
        SiglipEncoder("anything", device="cpu", backend="fast")


def test_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(inference.THREADS_ENV_VAR, "3")
    assert inference.default_threads() == 3
    monkeypatch.setenv(inference.THREADS_ENV_VAR, "0")
    with pytest.raises(ValueError):
        inference.default_threads()
    monkeypatch.delenv(inference.THREADS_ENV_VAR)
    assert 1 <= inference.default_threads() <= 4


def test_cpu_feature_probe_answers():
    assert isinstance(inference.cpu_has_vnni(), bool)


# --------------------------------------------------------------------------
# Quality: every faster path against float32 torch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FASTER)
def test_faster_backends_match_float32_torch(checkpoint, onnx_cache, reference, images, backend):
    fast = encoder(checkpoint, backend, onnx_cache)
    assert fast.backend == backend
    texts = fast.encode_texts(QUERIES)
    pictures = fast.encode_images(images)
    assert texts.dtype == pictures.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(pictures, axis=1), 1.0, atol=1e-4)
    text_cosines = np.sum(texts * reference.encode_texts(QUERIES), axis=1)
    image_cosines = np.sum(pictures * reference.encode_images(images), axis=1)
    assert text_cosines.min() >= MIN_COSINE, text_cosines
    assert image_cosines.min() >= MIN_COSINE, image_cosines
    if backend == "onnx":  # the same float32 arithmetic, reordered
        assert text_cosines.min() > 0.99999 and image_cosines.min() > 0.99999


def test_int8_with_reduced_range_keeps_quality(checkpoint, reference, images, tmp_path):
    fp32 = inference.ensure_onnx_export(checkpoint, "text", "onnx", reference._export_model, tmp_path)
    int8 = inference.quantize_int8(fp32, tmp_path / "text-rr.onnx", reduce_range=True)
    tower = inference.OnnxTower(int8, "text", threads=1)
    got = tower(reference.token_ids(QUERIES))
    assert np.sum(got * reference.encode_texts(QUERIES), axis=1).min() >= MIN_COSINE


@pytest.mark.parametrize("backend", FASTER)
def test_batches_match_one_by_one(checkpoint, onnx_cache, images, backend):
    # int8 too: an embedding must not depend on what else is in its batch.
    fast = encoder(checkpoint, backend, onnx_cache)
    batched = fast.encode_texts(QUERIES, batch_size=4)
    single = np.concatenate([fast.encode_texts([q]) for q in QUERIES])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    batched = fast.encode_images(images, batch_size=3)
    single = np.concatenate([fast.encode_images([i]) for i in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_empty_inputs_and_token_ids(checkpoint, onnx_cache):
    fast = encoder(checkpoint, "onnx-int8", onnx_cache)
    assert fast.encode_texts([]).shape == (0, fast.dim)
    assert fast.encode_images([]).shape == (0, fast.dim)
    ids = fast.token_ids(["a dog"])
    assert ids.shape == (1, siglip.TEXT_MAX_LENGTH) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, fast.tokenize(["a dog"])["input_ids"].numpy())
    np.testing.assert_allclose(fast.encode_token_ids(ids), fast.encode_texts(["a dog"]), atol=1e-6)
    with pytest.raises(ValueError):
        fast.encode_token_ids(np.zeros(64, dtype=np.int64))


# --------------------------------------------------------------------------
# Loading and the export cache
# --------------------------------------------------------------------------


def test_onnx_backend_reads_the_torch_weights_only_when_asked(checkpoint, onnx_cache, monkeypatch):
    encoder(checkpoint, "onnx-int8", onnx_cache).encode_texts(["warm the cache"])
    loads = []
    original = SiglipEncoder._load_model

    def counting(self, **kwargs):
        loads.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(SiglipEncoder, "_load_model", counting)
    fast = encoder(checkpoint, "onnx-int8", onnx_cache)
    assert fast.is_loaded
    fast.encode_texts(["a dog"])
    assert loads == []  # the cached export is used as it is
    model = fast.model  # the public torch model is still there on request
    assert model.dtype == torch.float32 and len(loads) == 1
    assert fast.model is model


def test_the_export_is_made_once_and_reused(checkpoint, tmp_path, monkeypatch):
    calls = []
    original = inference.export_tower

    def counting(model, tower, path):
        calls.append(tower)
        return original(model, tower, path)

    monkeypatch.setattr(inference, "export_tower", counting)
    encoders = [encoder(checkpoint, "onnx-int8", tmp_path) for _ in range(4)]
    threads = [threading.Thread(target=e.encode_texts, args=(["a dog"],)) for e in encoders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["text"]
    encoder(checkpoint, "onnx-int8", tmp_path).encode_texts(["a cat"])
    assert calls == ["text"]
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.onnx"))
    # Only the int8 file is kept (the float32 export was a step towards it), and no scratch folder.
    assert len(files) == 1 and "/text-int8" in f"/{files[0].split('/')[1]}", files


def test_the_cache_key_follows_the_weights(checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    first = inference.checkpoint_fingerprint(copy, memo_dir=tmp_path / "memo")
    assert inference.checkpoint_fingerprint(copy, memo_dir=tmp_path / "memo") == first
    assert inference.checkpoint_fingerprint(checkpoint) == first  # content, not the path
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert inference.checkpoint_fingerprint(copy, memo_dir=tmp_path / "memo") != first


def test_a_checkpoint_without_weights_is_not_available(checkpoint, tmp_path):
    import shutil

    target = tmp_path / "no-weights"
    shutil.copytree(checkpoint, target)
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(siglip.ModelNotAvailable):
        SiglipEncoder(str(target), device="cpu", backend="onnx-int8", onnx_cache_dir=tmp_path / "c").load()


def test_get_encoder_keeps_one_encoder_per_backend(checkpoint, onnx_cache, monkeypatch):
    monkeypatch.setattr(siglip, "_ENCODERS", {})
    plain = get_encoder(str(checkpoint), "cpu")
    assert plain.backend == "torch"
    fast = get_encoder(str(checkpoint), "cpu", backend="auto", onnx_cache_dir=onnx_cache)
    assert fast.backend == "onnx-int8" and fast is not plain
    assert get_encoder(str(checkpoint), "cpu", backend="onnx-int8") is fast
    assert get_encoder(str(checkpoint), "cpu", backend="torch") is plain
